//! The event bus to the manager: lifecycle events and the heartbeat, through a durable outbox.
//!
//! ```text
//! EventBus::emit ──channel──▶ writer task ──append+fsync──▶ events.jsonl (journal)
//!                                  │
//!                                  └─▶ backlog ──delivery task──▶ Redis XADD events (DB 4)
//!                                                     └──▶ events.delivered, then compaction
//! ```
//!
//! - [`EventBus`] is a cheap, cloneable handle. [`EventBus::emit`] queues the event and returns
//!   at once; it never blocks on disk or network and never fails the caller.
//! - The writer task appends every event to the journal ([`journal`]) and fsyncs it, one fsync
//!   per batch of events that arrived together, *before* delivery is tried.
//! - The delivery task ([`delivery`]) sends the journaled events in order to the stream
//!   `events` in Backend.AI's format, marks them delivered, and empties the journal once
//!   everything in it is delivered. Redis being down only delays it: retries back off up to
//!   10 s and the backlog goes out in order when Redis returns. Undelivered events of an
//!   earlier run are sent first, in order.
//! - The heartbeat task ([`heartbeat`]) emits `agent_heartbeat` every
//!   `debug.heartbeat-interval`. [`EventService::start`] emits the first heartbeat and then
//!   `agent_started("self-started")` (the manager registers an agent from its heartbeat)
//!   and [`EventService::shutdown`] emits `agent_terminated("shutdown")`, as Backend.AI's agent
//!   does.
//!
//! **Without Redis** (`[redis] addr` unset) nothing is sent: the journal `events.jsonl` in
//! `agent.journal-dir` is then the local JSON-lines record of the events, and writing it counts
//! as delivery. It is trimmed by size, keeping its newest [`LOCAL_JOURNAL_KEEP_BYTES`] once it
//! passes [`LOCAL_JOURNAL_MAX_BYTES`], so it never grows without bound.

pub mod bgtask;
pub mod delivery;
pub mod heartbeat;
pub mod journal;

use std::{
    collections::VecDeque,
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rmpv::Value;
use tokio::{
    sync::{Notify, mpsc},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

pub use self::{
    delivery::{RedisLink, RedisTarget, STREAM_KEY, STREAM_MAXLEN},
    heartbeat::{AgentIdentity, SlotProvider},
    journal::{Journal, JournalError, Record},
};
use crate::config::Config;

/// Without Redis, the journal is trimmed when it grows past this many bytes…
pub const LOCAL_JOURNAL_MAX_BYTES: u64 = 64 << 20;
/// …down to its newest this many bytes (whole records).
pub const LOCAL_JOURNAL_KEEP_BYTES: u64 = 32 << 20;
/// Events journaled with one fsync at most.
const WRITE_BATCH: usize = 1024;

/// One event for the manager: Backend.AI's event name and its arguments, which go to Redis as
/// one msgpack array (the manager's event classes `deserialize` that tuple).
#[derive(Debug, Clone, PartialEq)]
pub struct AgentEvent {
    pub name: String,
    pub args: Vec<Value>,
    pub timestamp: SystemTime,
}

/// msgpack of `args` as one array, with Backend.AI's options (str as str, bytes as bin).
pub fn pack_args(args: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, &Value::Array(args.to_vec()));
    out
}

/// Counters the bus's handles read (self-metrics).
#[derive(Debug, Default)]
struct Stats {
    /// Emitted and not yet delivered (without Redis: not yet journaled).
    backlog: AtomicU64,
    /// Delivered since start.
    delivered: AtomicU64,
    /// Emission time (ms since the epoch) of the oldest undelivered journaled event; 0: none.
    oldest_ms: AtomicU64,
}

impl Stats {
    fn backlog(&self) -> u64 {
        self.backlog.load(Ordering::Relaxed)
    }

    fn remove(&self, count: u64) {
        let _ = self.backlog.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(count)));
    }
}

fn epoch_ms(time: SystemTime) -> u64 {
    u64::try_from(time.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX).max(1)
}

/// A handle to emit events to the manager. Cheap to clone; every clone feeds the same outbox.
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: mpsc::UnboundedSender<AgentEvent>,
    stats: Arc<Stats>,
}

impl EventBus {
    /// Queues `name(*args)` for the manager and returns at once. Never blocks for long, never
    /// fails: the event is journaled and delivered in the background, in emission order.
    /// Events emitted after the event service shut down are dropped (and logged at debug).
    pub fn emit(&self, name: impl Into<String>, args: Vec<Value>) {
        let event = AgentEvent { name: name.into(), args, timestamp: SystemTime::now() };
        tracing::debug!(event = %event.name, "event emitted");
        self.stats.backlog.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::error::SendError(event)) = self.tx.send(event) {
            self.stats.remove(1);
            tracing::debug!(event = %event.name, "the event service has stopped; event dropped");
        }
    }

    /// Events emitted but not yet delivered to Redis (without Redis: not yet journaled).
    pub fn backlog_len(&self) -> u64 {
        self.stats.backlog()
    }

    /// How long the oldest journaled, undelivered event has waited; None when there is none.
    pub fn oldest_undelivered_age(&self) -> Option<Duration> {
        match self.stats.oldest_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => {
                Some(SystemTime::now().duration_since(UNIX_EPOCH + Duration::from_millis(ms)).unwrap_or(Duration::ZERO))
            }
        }
    }

    /// Events delivered to Redis (without Redis: journaled) since the agent started.
    pub fn delivered_total(&self) -> u64 {
        self.stats.delivered.load(Ordering::Relaxed)
    }

    /// A bus that is not connected to an outbox: what is emitted arrives on the receiver.
    /// For tests of code that emits events.
    pub fn capture() -> (EventBus, mpsc::UnboundedReceiver<AgentEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (EventBus { tx, stats: Arc::default() }, rx)
    }
}

/// The journal and the journaled, undelivered records, shared by the writer and delivery tasks.
/// Its lock is never held across an await.
struct Shared {
    outbox: Mutex<Outbox>,
    stats: Arc<Stats>,
}

struct Outbox {
    journal: Journal,
    /// Journaled and not yet delivered, in order (always empty without Redis).
    backlog: VecDeque<Record>,
    with_redis: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update_oldest(&self, outbox: &Outbox) {
        let oldest = outbox.backlog.front().map_or(0, |r| epoch_ms(r.timestamp));
        self.stats.oldest_ms.store(oldest, Ordering::Relaxed);
    }

    /// Journals `events` (one fsync) and queues them for delivery.
    fn append(&self, events: Vec<AgentEvent>) {
        let count = events.len() as u64;
        let unsequenced = events
            .into_iter()
            .map(|e| journal::Unsequenced { args: pack_args(&e.args), name: e.name, timestamp: e.timestamp })
            .collect();
        let mut outbox = self.lock();
        // A failed write is logged by the journal; the records are delivered from memory.
        let (records, _) = outbox.journal.append(unsequenced);
        let Some(last) = records.last().map(|r| r.seq) else {
            return;
        };
        if outbox.with_redis {
            outbox.backlog.extend(records);
            self.update_oldest(&outbox);
        } else {
            // Without Redis the journal is the record: writing it is delivery.
            if let Err(err) = outbox.journal.mark_delivered(last) {
                tracing::warn!(%err, "cannot update the event journal's delivered marker");
            }
            match outbox.journal.trim(LOCAL_JOURNAL_MAX_BYTES, LOCAL_JOURNAL_KEEP_BYTES) {
                Ok(true) => tracing::info!(
                    path = %outbox.journal.path().display(),
                    kept_bytes = outbox.journal.len_bytes(),
                    "trimmed the local event journal to its newest records"
                ),
                Ok(false) => {}
                Err(err) => tracing::warn!(%err, "cannot trim the local event journal"),
            }
            self.stats.remove(count);
            self.stats.delivered.fetch_add(count, Ordering::Relaxed);
        }
    }

    /// Up to `max` records from the front of the backlog.
    fn peek(&self, max: usize) -> Vec<Record> {
        self.lock().backlog.iter().take(max).cloned().collect()
    }

    /// `batch` (the front of the backlog) reached Redis: drop it from the backlog, persist the
    /// marker, and empty the journal when nothing is left.
    fn delivered(&self, batch: &[Record]) {
        let Some(last) = batch.last().map(|r| r.seq) else {
            return;
        };
        let mut outbox = self.lock();
        while outbox.backlog.front().is_some_and(|r| r.seq <= last) {
            outbox.backlog.pop_front();
        }
        self.update_oldest(&outbox);
        if let Err(err) = outbox.journal.mark_delivered(last) {
            tracing::warn!(%err, "cannot update the event journal's delivered marker; a restart may resend events");
        }
        if outbox.backlog.is_empty()
            && let Err(err) = outbox.journal.compact()
        {
            tracing::warn!(%err, "cannot compact the event journal");
        }
        self.stats.remove(batch.len() as u64);
        self.stats.delivered.fetch_add(batch.len() as u64, Ordering::Relaxed);
    }
}

/// Why the event service could not start.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("cannot use Redis at {addr} (redis.addr): {reason}")]
    Redis { addr: String, reason: String },
}

/// Settings of the event service, usually [`EventSettings::from_config`].
#[derive(Debug, Clone)]
pub struct EventSettings {
    pub agent_id: String,
    pub journal_dir: PathBuf,
    /// None: no Redis, the journal is the record.
    pub redis: Option<RedisTarget>,
    pub heartbeat_interval: Duration,
    pub identity: AgentIdentity,
    /// The stream entries' format (`redis.event-format`).
    pub event_format: crate::config::EventFormat,
    /// The pub/sub channel of 26.9's broadcast copies (`redis.broadcast-channel`).
    pub broadcast_channel: String,
}

impl EventSettings {
    pub fn from_config(config: &Config) -> EventSettings {
        EventSettings {
            agent_id: config.agent.id.clone(),
            journal_dir: config.agent.journal_dir.clone(),
            redis: config.redis.addr.clone().map(|addr| RedisTarget {
                addr,
                password: config.redis.password.clone(),
                db: config.redis.events_db,
            }),
            heartbeat_interval: config.debug.heartbeat_interval,
            identity: AgentIdentity::from_config(config),
            event_format: config.redis.event_format,
            broadcast_channel: config.redis.broadcast_channel.clone(),
        }
    }
}

/// The running event tasks (writer, delivery, heartbeat) and the bus that feeds them.
pub struct EventService {
    bus: EventBus,
    heartbeat_stop: CancellationToken,
    writer_stop: CancellationToken,
    delivery_stop: CancellationToken,
    heartbeat: Option<JoinHandle<()>>,
    writer: Option<JoinHandle<()>>,
    delivery: Option<JoinHandle<()>>,
}

impl EventService {
    /// Opens the journal (sending its undelivered events first), starts the writer, the
    /// delivery (with Redis) and the heartbeat tasks, and emits `agent_started`. The heartbeat
    /// stops when `shutdown` is cancelled; the rest stops in [`EventService::shutdown`].
    pub fn start(
        settings: EventSettings,
        slots: SlotProvider,
        shutdown: &CancellationToken,
    ) -> Result<EventService, EventsError> {
        let journal::Opened { journal, undelivered } = Journal::open(&settings.journal_dir)?;
        let stats = Arc::new(Stats::default());
        let with_redis = settings.redis.is_some();
        let mut backlog = VecDeque::new();
        if with_redis {
            if !undelivered.is_empty() {
                tracing::info!(
                    count = undelivered.len(),
                    first_seq = undelivered[0].seq,
                    "undelivered events from an earlier run go to Redis first"
                );
            }
            stats.backlog.store(undelivered.len() as u64, Ordering::Relaxed);
            backlog.extend(undelivered);
        } else if !undelivered.is_empty() {
            tracing::warn!(
                count = undelivered.len(),
                path = %journal.path().display(),
                "no Redis is configured: undelivered events of an earlier run stay in the local journal only"
            );
        }
        tracing::info!(
            journal = %journal.path().display(),
            redis = %settings.redis.as_ref().map_or_else(|| "none (local journal only)".to_owned(), |t| format!("{} db {}", t.addr, t.db)),
            heartbeat_interval = ?settings.heartbeat_interval,
            "event outbox ready"
        );
        let shared =
            Arc::new(Shared { outbox: Mutex::new(Outbox { journal, backlog, with_redis }), stats: stats.clone() });
        shared.update_oldest(&shared.lock());
        if let Some(target) = &settings.redis {
            // Fails only for settings the config already refused; better said at start.
            target
                .client()
                .map_err(|err| EventsError::Redis { addr: target.addr.to_string(), reason: err.to_string() })?;
        }

        let (tx, rx) = mpsc::unbounded_channel();
        let bus = EventBus { tx, stats };
        let notify = Arc::new(Notify::new());
        let writer_stop = CancellationToken::new();
        let delivery_stop = CancellationToken::new();
        let heartbeat_stop = shutdown.child_token();
        let writer = tokio::spawn(write_loop(shared.clone(), rx, notify.clone(), writer_stop.clone()));
        let delivery = settings.redis.map(|target| {
            notify.notify_one();
            tokio::spawn(delivery::run(
                shared,
                notify,
                target,
                settings.agent_id.clone(),
                settings.event_format,
                settings.broadcast_channel.clone(),
                delivery_stop.clone(),
            ))
        });
        // The first heartbeat goes before agent_started, as Backend.AI's agent sends them: the
        // manager registers an agent from its heartbeat and treats agent_started as a revival
        // of a registered one.
        heartbeat::beat(&bus, &settings.identity, &slots, 1);
        bus.emit("agent_started", vec![Value::from("self-started")]);
        let heartbeat = tokio::spawn(heartbeat::run(
            bus.clone(),
            settings.identity,
            slots,
            settings.heartbeat_interval,
            heartbeat_stop.clone(),
        ));
        Ok(EventService {
            bus,
            heartbeat_stop,
            writer_stop,
            delivery_stop,
            heartbeat: Some(heartbeat),
            writer: Some(writer),
            delivery,
        })
    }

    /// A handle to emit events (clone it freely).
    pub fn bus(&self) -> EventBus {
        self.bus.clone()
    }

    /// Stops the heartbeat, emits `agent_terminated("shutdown")`, journals everything still
    /// queued, gives delivery a few seconds to send what is left, and returns. What could not
    /// be sent stays in the journal for the next start.
    pub async fn shutdown(&mut self) {
        self.heartbeat_stop.cancel();
        if let Some(task) = self.heartbeat.take() {
            let _ = task.await;
        }
        self.bus.emit("agent_terminated", vec![Value::from("shutdown")]);
        self.writer_stop.cancel();
        if let Some(task) = self.writer.take() {
            let _ = task.await;
        }
        self.delivery_stop.cancel();
        if let Some(task) = self.delivery.take() {
            let _ = task.await;
        }
        tracing::info!(delivered = self.bus.delivered_total(), backlog = self.bus.backlog_len(), "event outbox closed");
    }
}

impl Drop for EventService {
    fn drop(&mut self) {
        self.heartbeat_stop.cancel();
        self.writer_stop.cancel();
        self.delivery_stop.cancel();
    }
}

/// Journals what arrives on `rx`, a batch per fsync, until `stop`; then journals what is
/// still queued and returns.
async fn write_loop(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<AgentEvent>,
    notify: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(64);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            received = rx.recv_many(&mut batch, WRITE_BATCH) => if received == 0 { break },
        }
        shared.append(std::mem::take(&mut batch));
        notify.notify_one();
    }
    while let Ok(event) = rx.try_recv() {
        batch.push(event);
    }
    // Closing makes later emits fail fast (and get logged) instead of queueing forever.
    rx.close();
    while let Ok(event) = rx.try_recv() {
        batch.push(event);
    }
    if !batch.is_empty() {
        shared.append(batch);
    }
    notify.notify_one();
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::rpc::codec::unpack;

    fn settings(dir: &std::path::Path, redis: Option<RedisTarget>) -> EventSettings {
        let mut config = Config::default();
        config.agent.id = "i-unit".into();
        config.agent.rpc_listen_addr = "127.0.0.1:6001".parse().expect("addr");
        let mut settings = EventSettings::from_config(&config);
        settings.journal_dir = dir.to_path_buf();
        settings.redis = redis;
        settings.heartbeat_interval = Duration::from_secs(3600);
        settings
    }

    fn slots() -> SlotProvider {
        Arc::new(|| BTreeMap::from([("cpu".to_owned(), "2".to_owned())]))
    }

    fn journal_lines(dir: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join(journal::JOURNAL_FILE))
            .expect("journal")
            .lines()
            .map(|line| serde_json::from_str(line).expect("json line"))
            .collect()
    }

    #[test]
    fn args_are_packed_as_one_msgpack_array() {
        // msgpack.packb(("k-1", "s-1", "user-requested", 0)) in Python.
        let args = [Value::from("k-1"), Value::from("s-1"), Value::from("user-requested"), Value::from(0)];
        let mut want = vec![0x94, 0xa3];
        want.extend_from_slice(b"k-1");
        want.push(0xa3);
        want.extend_from_slice(b"s-1");
        want.push(0xae);
        want.extend_from_slice(b"user-requested");
        want.push(0x00);
        assert_eq!(pack_args(&args), want);
        assert_eq!(pack_args(&[]), [0x90], "no arguments: an empty tuple");
        // Bytes are bin, not str (use_bin_type=True).
        assert_eq!(pack_args(&[Value::Binary(vec![1, 2])]), [0x91, 0xc4, 0x02, 0x01, 0x02]);
    }

    #[tokio::test]
    async fn without_redis_events_land_in_the_journal_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shutdown = CancellationToken::new();
        let mut service = EventService::start(settings(dir.path(), None), slots(), &shutdown).expect("start");
        let bus = service.bus();
        for n in 0..50 {
            bus.emit("kernel_started", vec![Value::from(format!("k-{n}"))]);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !journal_lines(dir.path()).iter().any(|l| l["name"] == "agent_heartbeat") {
            assert!(tokio::time::Instant::now() < deadline, "no heartbeat in the journal");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        service.shutdown().await;
        let lines = journal_lines(dir.path());
        let names: Vec<&str> = lines.iter().map(|l| l["name"].as_str().expect("name")).collect();
        // The first heartbeat goes out at start, before agent_started.
        assert_eq!(names[..2], ["agent_heartbeat", "agent_started"], "{names:?}");
        assert_eq!(names.last(), Some(&"agent_terminated"));
        let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().expect("seq")).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        let kernels: Vec<String> = lines
            .iter()
            .filter(|l| l["name"] == "kernel_started")
            .map(|l| {
                let args = unpack(&decode_args(l), "args").expect("msgpack");
                args.as_array().expect("array")[0].as_str().expect("str").to_owned()
            })
            .collect();
        assert_eq!(kernels, (0..50).map(|n| format!("k-{n}")).collect::<Vec<_>>());
        assert_eq!(bus.backlog_len(), 0);
        assert!(bus.oldest_undelivered_age().is_none());
        // Emitting after shutdown neither blocks nor panics.
        bus.emit("late", vec![]);
    }

    #[tokio::test]
    async fn with_redis_down_events_wait_in_the_journal_and_count_as_backlog() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let target = RedisTarget { addr: format!("127.0.0.1:{port}").parse().expect("addr"), password: None, db: 4 };
        let shutdown = CancellationToken::new();
        let mut service =
            EventService::start(settings(dir.path(), Some(target.clone())), slots(), &shutdown).expect("start");
        let bus = service.bus();
        bus.emit("kernel_started", vec![Value::from("k-1")]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while journal_lines(dir.path()).len() < 3 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(bus.backlog_len(), 3, "agent_started, the first heartbeat and kernel_started");
        assert!(bus.oldest_undelivered_age().is_some());
        service.shutdown().await;
        let mut names: Vec<String> =
            journal_lines(dir.path()).iter().map(|l| l["name"].as_str().expect("name").to_owned()).collect();
        assert_eq!(names.first().map(String::as_str), Some("agent_heartbeat"));
        assert_eq!(names.get(1).map(String::as_str), Some("agent_started"));
        assert_eq!(names.last().map(String::as_str), Some("agent_terminated"));
        names.sort();
        assert_eq!(names, ["agent_heartbeat", "agent_started", "agent_terminated", "kernel_started"]);
        drop(service);

        // The next start finds them undelivered, first in line.
        let opened = Journal::open(dir.path()).expect("reopen");
        assert_eq!(opened.undelivered.len(), 4);
        drop(opened);
        let mut service = EventService::start(settings(dir.path(), Some(target)), slots(), &shutdown).expect("restart");
        assert!(service.bus().backlog_len() >= 4);
        service.shutdown().await;
    }

    #[tokio::test]
    async fn capture_hands_emitted_events_to_the_test() {
        let (bus, mut rx) = EventBus::capture();
        bus.emit("kernel_terminated", vec![Value::from("k"), Value::from("s"), Value::from("oom-killed")]);
        let event = rx.recv().await.expect("event");
        assert_eq!(event.name, "kernel_terminated");
        assert_eq!(event.args[2], Value::from("oom-killed"));
    }

    fn decode_args(line: &serde_json::Value) -> Vec<u8> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.decode(line["args"].as_str().expect("args")).expect("base64")
    }
}
