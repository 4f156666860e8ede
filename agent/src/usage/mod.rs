//! Usage records for billing: exact per-window deltas of what each kernel used, journaled
//! before they are sent and delivered at least once with stable ids (docs/USAGE.md).
//!
//! ```text
//! monitor snapshots ─┐
//! kernel lifecycle ──┴▶ meter task ──append+fsync──▶ usage.jsonl ──▶ redis task ─▶ XADD usage
//!   (UsageHandle)                                          └──────▶ http task  ─▶ POST batch
//! ```
//!
//! - [`meter`] turns the monitor's cumulative counters into windows and checkpoints;
//!   [`record`] is the CloudEvent and its exact decimal fields.
//! - [`journal`] keeps every line on disk first; a restarted agent resumes each kernel's
//!   sequence and baseline from its last checkpoint.
//! - [`sinks`]: the Redis stream and the optional HTTP endpoint, each with its own delivery
//!   task and marker; a record leaves the backlog of a sink only when that sink confirmed it.
//! - [`UsageHandle`] is how the kernel manager says a kernel started or ended.

pub mod journal;
pub mod meter;
pub mod record;
pub mod sinks;

use std::{
    collections::{HashSet, VecDeque},
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    sync::{Notify, mpsc, watch},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

pub use self::{
    journal::UsageJournal,
    meter::{Meter, UsageLine},
    record::{CloudEvent, Counts, KernelMeta, UsageData},
    sinks::{Pending, Sink},
};
use crate::{
    config::Config,
    events::RedisTarget,
    journal::{JournalError, Sequenced},
    metrics::MonitorSnapshot,
};

/// What the kernel manager tells the meter.
#[derive(Debug)]
enum Lifecycle {
    Started(KernelMeta, SystemTime),
    Terminated { kernel_id: String, reason: String, at: SystemTime },
    Reconciled(HashSet<String>, SystemTime),
}

/// Tells the usage meter about kernels. Cheap to clone; never blocks, never fails.
#[derive(Debug, Clone)]
pub struct UsageHandle {
    tx: Option<mpsc::UnboundedSender<Lifecycle>>,
}

impl UsageHandle {
    /// A handle that goes nowhere (no usage service).
    pub fn disconnected() -> UsageHandle {
        UsageHandle { tx: None }
    }

    fn send(&self, message: Lifecycle) {
        if let Some(tx) = &self.tx
            && tx.send(message).is_err()
        {
            tracing::debug!("the usage meter has stopped; a kernel lifecycle change was not metered");
        }
    }

    /// The kernel runs (created, restarted, or found running after an agent restart).
    pub fn kernel_started(&self, meta: KernelMeta) {
        self.send(Lifecycle::Started(meta, SystemTime::now()));
    }

    /// The kernel ended for `reason`; its final record follows.
    pub fn kernel_terminated(&self, kernel_id: &str, reason: &str) {
        self.send(Lifecycle::Terminated {
            kernel_id: kernel_id.to_owned(),
            reason: reason.to_owned(),
            at: SystemTime::now(),
        });
    }

    /// After recovery: these kernels run; any other metered kernel ended meanwhile.
    pub fn kernels_recovered(&self, live: HashSet<String>) {
        self.send(Lifecycle::Reconciled(live, SystemTime::now()));
    }
}

/// Counters for the self-metrics.
#[derive(Debug, Default)]
pub struct UsageStats {
    /// Records written (event lines, not checkpoints).
    pub records: AtomicU64,
    pub metered_kernels: AtomicU64,
    /// Per sink: records it confirmed, failed attempts.
    pub delivered: Vec<AtomicU64>,
    pub failures: Vec<AtomicU64>,
}

struct Outbox {
    journal: UsageJournal,
    backlogs: Vec<VecDeque<Pending>>,
}

/// The journal and the sinks' backlogs, shared by the meter and the delivery tasks.
pub(crate) struct Shared {
    outbox: Mutex<Outbox>,
    stats: UsageStats,
    sink_names: Vec<&'static str>,
}

fn pending(record: &Sequenced<UsageLine>) -> Option<Pending> {
    let event = record.item.event.as_ref()?;
    match serde_json::to_string(event) {
        Ok(json) => Some(Pending {
            seq: record.seq,
            json: json.into(),
            made: UNIX_EPOCH + Duration::from_nanos(record.item.checkpoint.window_start_ns),
        }),
        Err(err) => {
            tracing::error!(seq = record.seq, %err, "a usage record does not serialize");
            None
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Journals `lines` (one fsync) and queues their records for every sink.
    fn record(&self, lines: Vec<UsageLine>) {
        if lines.is_empty() {
            return;
        }
        let mut outbox = self.lock();
        // A failed write is logged by the journal; the records are delivered from memory.
        let (records, _) = outbox.journal.append(lines);
        let queued: Vec<Pending> = records.iter().filter_map(pending).collect();
        self.stats.records.fetch_add(queued.len() as u64, Ordering::Relaxed);
        for backlog in &mut outbox.backlogs {
            backlog.extend(queued.iter().cloned());
        }
        if outbox.backlogs.is_empty() {
            Self::rewrite_if_large(&mut outbox);
        }
    }

    fn rewrite_if_large(outbox: &mut Outbox) {
        match outbox.journal.maybe_rewrite() {
            Ok(true) => tracing::info!(
                path = %outbox.journal.path().display(),
                bytes = outbox.journal.len_bytes(),
                "rewrote the usage journal without what every sink has"
            ),
            Ok(false) => {}
            Err(err) => tracing::warn!(%err, "cannot rewrite the usage journal"),
        }
    }

    fn peek(&self, sink: usize, max: usize) -> Vec<Pending> {
        self.lock().backlogs.get(sink).map(|b| b.iter().take(max).cloned().collect()).unwrap_or_default()
    }

    fn delivered(&self, sink: usize, batch: &[Pending]) {
        let Some(last) = batch.last().map(|p| p.seq) else {
            return;
        };
        let mut outbox = self.lock();
        let journal_last = outbox.journal.last_seq();
        let Some(backlog) = outbox.backlogs.get_mut(sink) else {
            return;
        };
        while backlog.front().is_some_and(|p| p.seq <= last) {
            backlog.pop_front();
        }
        // Checkpoint lines between records count as delivered with them.
        let through = backlog.front().map_or(journal_last, |p| p.seq - 1);
        if let Err(err) = outbox.journal.mark_delivered(sink, through.max(last)) {
            tracing::warn!(%err, "cannot update a usage sink's delivered marker; a restart may resend records");
        }
        Self::rewrite_if_large(&mut outbox);
        self.stats.delivered[sink].fetch_add(batch.len() as u64, Ordering::Relaxed);
    }

    /// Per sink: (records waiting, age of the oldest).
    pub(crate) fn backlog(&self, sink: usize) -> (u64, Option<Duration>) {
        let outbox = self.lock();
        let Some(backlog) = outbox.backlogs.get(sink) else {
            return (0, None);
        };
        let age = backlog.front().map(|p| SystemTime::now().duration_since(p.made).unwrap_or_default());
        (backlog.len() as u64, age)
    }
}

/// What the self-metrics read.
#[derive(Clone)]
pub struct UsageView {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for UsageView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageView").field("sinks", &self.shared.sink_names).finish()
    }
}

impl UsageView {
    pub fn sinks(&self) -> &[&'static str] {
        &self.shared.sink_names
    }

    /// Records waiting for `sink` and the age of the oldest.
    pub fn backlog(&self, sink: usize) -> (u64, Option<Duration>) {
        self.shared.backlog(sink)
    }

    pub fn stats(&self) -> &UsageStats {
        &self.shared.stats
    }

    pub fn journal_bytes(&self) -> u64 {
        self.shared.lock().journal.len_bytes()
    }
}

/// Why the usage service could not start.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("cannot use usage sink {sink}: {reason}")]
    Sink { sink: String, reason: String },
}

/// How to reach one sink.
#[derive(Debug, Clone)]
pub enum SinkSettings {
    Redis { target: RedisTarget, stream: String, retention: Duration },
    Http { endpoint: String, token: Option<String>, timeout: Duration },
}

/// Settings of the usage service, usually [`UsageSettings::from_config`].
#[derive(Debug, Clone)]
pub struct UsageSettings {
    pub agent_id: String,
    pub journal_dir: PathBuf,
    pub interval: Duration,
    pub sinks: Vec<SinkSettings>,
}

impl UsageSettings {
    pub fn from_config(config: &Config) -> UsageSettings {
        let mut sinks = Vec::new();
        if let Some(addr) = &config.redis.addr {
            sinks.push(SinkSettings::Redis {
                target: RedisTarget {
                    addr: addr.clone(),
                    password: config.redis.password.clone(),
                    db: config.redis.events_db,
                },
                stream: config.usage.stream.clone(),
                retention: config.usage.stream_retention,
            });
        }
        if let Some(endpoint) = &config.usage.http_endpoint {
            sinks.push(SinkSettings::Http {
                endpoint: endpoint.clone(),
                token: config.usage.http_bearer_token.clone(),
                timeout: config.usage.http_timeout,
            });
        }
        UsageSettings {
            agent_id: config.agent.id.clone(),
            journal_dir: config.agent.journal_dir.clone(),
            interval: config.usage.interval,
            sinks,
        }
    }
}

/// The meter and the delivery tasks.
pub struct UsageService {
    handle: UsageHandle,
    view: UsageView,
    meter_stop: CancellationToken,
    sinks_stop: CancellationToken,
    meter: Option<JoinHandle<()>>,
    deliveries: Vec<JoinHandle<()>>,
}

impl UsageService {
    /// Opens the journal (resuming open windows and queueing undelivered records first) and
    /// starts the meter on `snapshots` and one delivery task per sink.
    pub fn start(
        settings: UsageSettings,
        snapshots: watch::Receiver<Arc<MonitorSnapshot>>,
    ) -> Result<UsageService, UsageError> {
        let mut sinks = Vec::new();
        for sink in settings.sinks {
            let (name, made) = match sink {
                SinkSettings::Redis { target, stream, retention } => {
                    ("redis", Sink::redis(target, stream, retention).map_err(|err| err.to_string()))
                }
                SinkSettings::Http { endpoint, token, timeout } => ("http", Sink::http(endpoint, token, timeout)),
            };
            sinks.push(made.map_err(|reason| UsageError::Sink { sink: name.to_owned(), reason })?);
        }
        let names: Vec<&'static str> = sinks.iter().map(Sink::name).collect();
        let journal::OpenedUsage { journal, open_windows, backlogs } =
            UsageJournal::open(&settings.journal_dir, &names)?;
        let backlogs: Vec<VecDeque<Pending>> =
            backlogs.iter().map(|records| records.iter().filter_map(pending).collect()).collect();
        for (name, backlog) in names.iter().zip(&backlogs) {
            if !backlog.is_empty() {
                tracing::info!(
                    sink = name,
                    count = backlog.len(),
                    "undelivered usage records of an earlier run go first"
                );
            }
        }
        if names.is_empty() {
            tracing::warn!(
                path = %journal.path().display(),
                "no usage sink (neither redis.addr nor usage.http-endpoint): usage records stay in the local journal only"
            );
        }
        let mut meter = Meter::new(&settings.agent_id, u64::try_from(settings.interval.as_nanos()).unwrap_or(u64::MAX));
        if !open_windows.is_empty() {
            tracing::info!(kernels = open_windows.len(), "resuming usage metering from the journal's checkpoints");
        }
        meter.resume(open_windows);
        tracing::info!(
            journal = %journal.path().display(),
            interval = ?settings.interval,
            sinks = %sinks.iter().map(Sink::target).collect::<Vec<_>>().join(", "),
            "usage meter ready"
        );
        let shared = Arc::new(Shared {
            outbox: Mutex::new(Outbox { journal, backlogs }),
            stats: UsageStats {
                delivered: names.iter().map(|_| AtomicU64::new(0)).collect(),
                failures: names.iter().map(|_| AtomicU64::new(0)).collect(),
                ..UsageStats::default()
            },
            sink_names: names,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let meter_stop = CancellationToken::new();
        let sinks_stop = CancellationToken::new();
        let notifies: Vec<Arc<Notify>> = sinks.iter().map(|_| Arc::new(Notify::new())).collect();
        let deliveries = sinks
            .into_iter()
            .zip(&notifies)
            .enumerate()
            .map(|(index, (sink, notify))| {
                notify.notify_one();
                tokio::spawn(sinks::deliver(shared.clone(), index, sink, notify.clone(), sinks_stop.clone()))
            })
            .collect();
        let meter = tokio::spawn(run_meter(meter, shared.clone(), snapshots, rx, notifies, meter_stop.clone()));
        Ok(UsageService {
            handle: UsageHandle { tx: Some(tx) },
            view: UsageView { shared },
            meter_stop,
            sinks_stop,
            meter: Some(meter),
            deliveries,
        })
    }

    pub fn handle(&self) -> UsageHandle {
        self.handle.clone()
    }

    pub fn view(&self) -> UsageView {
        self.view.clone()
    }

    /// Stops the meter (after the monitor's last snapshot: kernels that ended get their final
    /// record, running ones keep their checkpoint), then gives each sink a few seconds to
    /// send what is left.
    pub async fn shutdown(&mut self) {
        self.meter_stop.cancel();
        if let Some(task) = self.meter.take() {
            let _ = task.await;
        }
        self.sinks_stop.cancel();
        for task in self.deliveries.drain(..) {
            let _ = task.await;
        }
        let backlogs: Vec<u64> = (0..self.view.sinks().len()).map(|i| self.view.backlog(i).0).collect();
        tracing::info!(records = self.view.stats().records.load(Ordering::Relaxed), ?backlogs, "usage meter closed");
    }
}

impl Drop for UsageService {
    fn drop(&mut self) {
        self.meter_stop.cancel();
        self.sinks_stop.cancel();
    }
}

fn observe(meter: &mut Meter, snapshot: &MonitorSnapshot) -> Vec<UsageLine> {
    // Per container, its accelerator utilisation per type, summed over the devices it uses.
    let mut per_container: std::collections::HashMap<&str, Vec<(&'static str, u64)>> = std::collections::HashMap::new();
    for used in &snapshot.accelerator_use {
        let per_type = per_container.entry(used.kernel.container_id.as_str()).or_default();
        match per_type.iter_mut().find(|(kind, _)| *kind == used.plugin) {
            Some((_, pct)) => *pct += u64::from(used.utilization_pct),
            None => per_type.push((used.plugin, u64::from(used.utilization_pct))),
        }
    }
    let none: Vec<(&'static str, u64)> = Vec::new();
    let accel: Vec<&Vec<(&'static str, u64)>> = snapshot
        .containers
        .iter()
        .map(|sample| per_container.get(sample.kernel.container_id.as_str()).unwrap_or(&none))
        .collect();
    let observations: Vec<meter::Observation<'_>> = snapshot
        .containers
        .iter()
        .zip(&accel)
        .map(|(sample, accel)| meter::Observation {
            kernel_id: &sample.kernel.kernel_id,
            container_id: &sample.kernel.container_id,
            cgroup_id: sample.cgroup_id,
            totals: Counts::from(&sample.readings.counters),
            run: Counts::from(&sample.run),
            mem_bytes: sample.readings.memory.working_set,
            accel_util_pct: accel,
        })
        .collect();
    let ended: Vec<(u64, Counts)> = snapshot.ended_runs.iter().map(|(id, c)| (*id, Counts::from(c))).collect();
    meter.observe(record::unix_ns(snapshot.taken_at), &observations, &ended, snapshot.synced)
}

fn apply(meter: &mut Meter, message: Lifecycle) -> Vec<UsageLine> {
    match message {
        Lifecycle::Started(meta, at) => meter.start(meta, record::unix_ns(at)).into_iter().collect(),
        Lifecycle::Terminated { kernel_id, reason, at } => {
            meter.terminate(&kernel_id, &reason, record::unix_ns(at));
            Vec::new()
        }
        Lifecycle::Reconciled(live, at) => {
            meter.reconcile(&live, record::unix_ns(at));
            Vec::new()
        }
    }
}

/// Applies lifecycle messages and snapshots as they come, journaling the lines they make.
async fn run_meter(
    mut meter: Meter,
    shared: Arc<Shared>,
    mut snapshots: watch::Receiver<Arc<MonitorSnapshot>>,
    mut lifecycle: mpsc::UnboundedReceiver<Lifecycle>,
    notifies: Vec<Arc<Notify>>,
    stop: CancellationToken,
) {
    let mut handles_open = true;
    let mut snapshots_open = true;
    loop {
        let lines = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            message = lifecycle.recv(), if handles_open => match message {
                Some(message) => apply(&mut meter, message),
                None => { handles_open = false; continue }
            },
            // With no kernel to meter, snapshots are not even looked at (nor the task woken).
            changed = snapshots.changed(), if snapshots_open && !meter.is_empty() => match changed {
                Ok(()) => {
                    let snapshot = snapshots.borrow_and_update().clone();
                    observe(&mut meter, &snapshot)
                }
                Err(_) => { snapshots_open = false; continue }
            },
        };
        shared.stats.metered_kernels.store(meter.len() as u64, Ordering::Relaxed);
        if !lines.is_empty() {
            shared.record(lines);
            notifies.iter().for_each(|n| n.notify_one());
        }
    }
    // The monitor's last snapshot, then the final records of kernels that ended just before.
    let mut lines = Vec::new();
    while let Ok(message) = lifecycle.try_recv() {
        lines.extend(apply(&mut meter, message));
    }
    if snapshots.has_changed().unwrap_or(false) {
        let snapshot = snapshots.borrow_and_update().clone();
        lines.extend(observe(&mut meter, &snapshot));
    }
    lines.extend(meter.finish_ending(record::unix_ns(SystemTime::now())));
    shared.record(lines);
    notifies.iter().for_each(|n| n.notify_one());
}
