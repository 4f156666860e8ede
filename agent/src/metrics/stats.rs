//! The measurements for the manager, in Redis as the Python agent writes them
//! (`redis.stats-db`, Backend.AI's 0): every `monitor.stats-interval`, key `{kernel_id}` →
//! msgpack `{metric_key: measurement}` for each kernel, and key `{agent_id}` → msgpack
//! `{"node": {...}, "devices": {...}}`, all `SET … EX` in one pipeline.
//!
//! Kernel keys live a day (the Python agent's default, so the manager finds a finished
//! kernel's last stats); the node key four intervals. Only the latest values matter, so
//! nothing is queued during an outage: it is logged once, and the next write after Redis
//! answers again brings everything up to date.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio_util::sync::CancellationToken;

use super::{MetricsState, measurements::Measurements};
use crate::events::{RedisLink, RedisTarget};

/// TTL of a kernel's stats key, seconds.
pub const KERNEL_STATS_TTL_SECS: u64 = 86_400;
/// The node's key lives this many stats intervals.
pub const NODE_STATS_TTL_INTERVALS: u32 = 4;

/// Writes of the measurements so far, for `/metrics` (and the alert on stats not written).
#[derive(Debug, Default)]
pub struct StatsWrites {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// Unix milliseconds of the last write Redis took; 0 before the first.
    pub last_ok_unix_ms: AtomicU64,
}

impl StatsWrites {
    fn record(&self, ok: bool) {
        if ok {
            self.ok.fetch_add(1, Ordering::Relaxed);
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
            self.last_ok_unix_ms.store(u64::try_from(now).unwrap_or(u64::MAX), Ordering::Relaxed);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether a write was tried at all (the agent writes stats only with Redis).
    pub fn attempted(&self) -> bool {
        self.ok.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed) > 0
    }
}

/// The pipeline that writes the latest measurements: the kernels of the latest snapshot and the node.
pub fn stats_pipeline(agent_id: &str, measurements: &Measurements, interval: Duration) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for (kernel_id, stats) in measurements.latest_kernels() {
        pipe.cmd("SET").arg(kernel_id).arg(stats).arg("EX").arg(KERNEL_STATS_TTL_SECS).ignore();
    }
    let ttl = (interval * NODE_STATS_TTL_INTERVALS).as_secs().max(1);
    pipe.cmd("SET").arg(agent_id).arg(measurements.node()).arg("EX").arg(ttl).ignore();
    pipe
}

/// Writes the latest measurements every `interval` until `shutdown`.
pub async fn run_stats_writer(
    target: RedisTarget,
    agent_id: String,
    state: Arc<MetricsState>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let client = match target.client() {
        Ok(client) => client,
        Err(err) => {
            tracing::error!(redis = %target.addr, %err, "cannot set up the Redis client; no stats for the manager");
            return;
        }
    };
    let mut link = RedisLink::new(client);
    let mut ticker = crate::clock::Clock::new(interval);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let pipe = state.with_measurements(|measurements| stats_pipeline(&agent_id, measurements, interval));
        let written = link.run(&pipe).await;
        state.stats_writes.record(written.is_ok());
        match written {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(redis = %target.addr, "writing stats to Redis again");
            }
            Ok(()) => {}
            Err(err) if !failing => {
                failing = true;
                tracing::warn!(redis = %target.addr, db = target.db, %err, "cannot write stats to Redis; retrying every interval");
            }
            Err(_) => {}
        }
    }
}
