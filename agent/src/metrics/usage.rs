//! Usage-record self-metrics: records made, each sink's backlog (size and age of the oldest
//! record), deliveries and failures, the journal's size and the kernels being metered.

use std::sync::atomic::Ordering;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

use crate::usage::UsageView;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SinkLabels {
    sink: &'static str,
}

#[derive(Debug)]
pub struct UsageCollector(pub UsageView);

fn gauge(value: u64) -> ConstGauge {
    ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX))
}

impl Collector for UsageCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let view = &self.0;
        let stats = view.stats();
        let family = encoder.encode_descriptor(
            "backendai_agent_usage_records",
            "Usage records written to the journal.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(stats.records.load(Ordering::Relaxed)).encode(family)?;
        for (name, help, value) in [
            (
                "backendai_agent_usage_metered_kernels",
                "Kernels whose usage is being metered.",
                stats.metered_kernels.load(Ordering::Relaxed),
            ),
            ("backendai_agent_usage_journal_bytes", "Size of the usage journal.", view.journal_bytes()),
        ] {
            gauge(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }
        let backlogs: Vec<_> = (0..view.sinks().len()).map(|i| view.backlog(i)).collect();
        let mut family = encoder.encode_descriptor(
            "backendai_agent_usage_backlog_records",
            "Usage records a sink has not confirmed yet.",
            None,
            MetricType::Gauge,
        )?;
        for (sink, (count, _)) in view.sinks().iter().zip(&backlogs) {
            gauge(*count).encode(family.encode_family(&SinkLabels { sink })?)?;
        }
        let mut family = encoder.encode_descriptor(
            "backendai_agent_usage_backlog_age",
            "Age of the oldest usage record a sink has not confirmed (0: none waiting).",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        for (sink, (_, age)) in view.sinks().iter().zip(&backlogs) {
            let seconds = age.map_or(0.0, |age| age.as_secs_f64());
            ConstGauge::new(seconds).encode(family.encode_family(&SinkLabels { sink })?)?;
        }
        for (name, help, counters) in [
            ("backendai_agent_usage_delivered", "Usage records a sink confirmed.", &stats.delivered),
            ("backendai_agent_usage_delivery_failures", "Failed delivery attempts per sink.", &stats.failures),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (sink, counter) in view.sinks().iter().zip(counters) {
                ConstCounter::new(counter.load(Ordering::Relaxed))
                    .encode(family.encode_family(&SinkLabels { sink })?)?;
            }
        }
        Ok(())
    }
}
