//! Event self-metrics: the events for the manager that wait in the journal (how many, and how
//! long the oldest has waited) and how many were delivered, so an operator sees a Redis outage
//! piling events up before the manager notices kernels it never heard of.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Unit,
};

use crate::events::EventBus;

#[derive(Debug)]
pub struct EventCollector(pub EventBus);

impl Collector for EventCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let bus = &self.0;
        let backlog = i64::try_from(bus.backlog_len()).unwrap_or(i64::MAX);
        ConstGauge::new(backlog).encode(encoder.encode_descriptor(
            "backendai_agent_events_backlog",
            "Events for the manager emitted and not yet delivered to Redis (without Redis: not yet journaled).",
            None,
            MetricType::Gauge,
        )?)?;
        let age = bus.oldest_undelivered_age().map_or(0.0, |age| age.as_secs_f64());
        ConstGauge::new(age).encode(encoder.encode_descriptor(
            "backendai_agent_events_backlog_age",
            "Age of the oldest journaled event not yet delivered (0: none waiting).",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?)?;
        ConstCounter::new(bus.delivered_total()).encode(encoder.encode_descriptor(
            "backendai_agent_events_delivered",
            "Events delivered to Redis (without Redis: journaled) since the agent started.",
            None,
            MetricType::Counter,
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_counts_what_is_emitted_and_not_delivered() {
        let (bus, _rx) = EventBus::capture();
        bus.emit("agent_heartbeat", Vec::new());
        bus.emit("kernel_started", Vec::new());
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(EventCollector(bus)));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        assert!(text.contains("backendai_agent_events_backlog 2\n"), "{text}");
        assert!(text.contains("backendai_agent_events_backlog_age_seconds 0.0\n"), "{text}");
        assert!(text.contains("backendai_agent_events_delivered_total 0\n"), "{text}");
    }
}
