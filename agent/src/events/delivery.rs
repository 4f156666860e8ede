//! Delivery of journaled events to the manager's Redis, in Backend.AI's wire format.
//!
//! Each event becomes one stream entry, as Backend.AI's event producer writes it, in database
//! `redis.events-db` (4):
//!
//! ```text
//! XADD events MAXLEN ~ 128 * name <event name> source <agent id> payload <JSON of the fields>   (26.9)
//! XADD events MAXLEN ~ 128 * name <event name> source <agent id> args <msgpack of the args>     (≤ 25.x)
//! ```
//!
//! (`redis.event-format`; [`wire`] renders the last field.) `args` is msgpack with Backend.AI's
//! options (`str` as str, bytes as bin), the arguments packed as one array, which the manager
//! unpacks into a tuple. `MAXLEN ~ 128` is the approximate trim Backend.AI's own producers use.
//!
//! Entries go out in journal order, several at a time in one `MULTI`/`EXEC` so that a batch is
//! added whole or not at all. When Redis cannot be reached the backlog waits in the journal,
//! retries back off up to [`MAX_BACKOFF`], one warning is logged per outage, and the backlog
//! goes out in order when Redis answers again. Delivery is at least once: an event is resent
//! only when the agent stopped (or the connection broke) after Redis took it but before the
//! agent learnt so.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use redis::{AsyncConnectionConfig, Client, Cmd, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, aio};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Shared, journal::Record};
use crate::{
    backendai::events::{self as wire, EventFormat, WireError},
    config::RedisAddr,
};

/// The stream Backend.AI's manager consumes events from.
pub const STREAM_KEY: &str = "events";
/// Backend.AI's producers trim the stream to about this many entries (`MAXLEN ~`).
pub const STREAM_MAXLEN: usize = 128;
/// Entries per `MULTI`/`EXEC`.
pub const BATCH: usize = 64;
/// The first retry after a failure waits this long, doubling up to [`MAX_BACKOFF`].
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown keeps trying to deliver what is left (`agent_terminated` included).
const FINAL_FLUSH: Duration = Duration::from_secs(3);
/// The same while Redis is known to be down: one quick try.
const FINAL_FLUSH_IN_OUTAGE: Duration = Duration::from_millis(500);

/// Where events go.
#[derive(Debug, Clone)]
pub struct RedisTarget {
    pub addr: RedisAddr,
    pub password: Option<String>,
    pub db: u32,
}

impl RedisTarget {
    pub fn client(&self) -> redis::RedisResult<Client> {
        let mut settings = RedisConnectionInfo::default().set_db(i64::from(self.db));
        if let Some(password) = &self.password {
            settings = settings.set_password(password);
        }
        let info = ConnectionAddr::Tcp(self.addr.host.clone(), self.addr.port)
            .into_connection_info()?
            .set_redis_settings(settings);
        Client::open(info)
    }
}

/// The commands that deliver one record ([`wire::delivery`]): `XADD events MAXLEN ~ 128 * name
/// <name> source <agent_id> <payload field>` (`payload <JSON>` for 26.9, `args <msgpack>` for
/// ≤ 25.x) when the event is a stream entry; for a 26.9 broadcast, `SET <cache id> <message> EX
/// 300` when it is cached, then `PUBLISH <channel> <message>`. An event that has no 26.9 form
/// is an error naming it (the manager would drop it); one the format does not carry gives none.
pub fn commands(route: &Route<'_>, record: &Record) -> Result<Vec<Cmd>, WireError> {
    let Some(delivery) = wire::delivery(route.format, &record.name, &record.args)? else { return Ok(Vec::new()) };
    let mut commands = Vec::with_capacity(3);
    if let Some((field, value)) = delivery.stream_field {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(STREAM_KEY)
            .arg("MAXLEN")
            .arg("~")
            .arg(STREAM_MAXLEN)
            .arg("*")
            .arg("name")
            .arg(record.name.as_str())
            .arg("source")
            .arg(route.agent_id)
            .arg(field)
            .arg(value);
        commands.push(cmd);
    }
    if let Some(broadcast) = delivery.broadcast {
        let message = broadcast.message(&record.name, route.agent_id);
        if let Some(cache_id) = &broadcast.cache_id {
            let mut cmd = redis::cmd("SET");
            cmd.arg(cache_id).arg(&message).arg("EX").arg(wire::BROADCAST_CACHE_TTL_SECS);
            commands.push(cmd);
        }
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(route.broadcast_channel).arg(message);
        commands.push(cmd);
    }
    Ok(commands)
}

/// Where and how events go: the wire format, the agent id they come from, the broadcast channel.
#[derive(Debug, Clone, Copy)]
pub struct Route<'a> {
    pub format: EventFormat,
    pub agent_id: &'a str,
    pub broadcast_channel: &'a str,
}

/// One connection to Redis, made on demand and dropped on any error (the next use reconnects).
pub struct RedisLink {
    client: Client,
    conn: Option<aio::MultiplexedConnection>,
}

impl RedisLink {
    pub fn new(client: Client) -> Self {
        RedisLink { client, conn: None }
    }

    /// Drops the connection; the next use makes a new one.
    pub fn reset(&mut self) {
        self.conn = None;
    }

    /// Runs `pipe` (its replies ignored).
    pub async fn run(&mut self, pipe: &redis::Pipeline) -> redis::RedisResult<()> {
        let conn = match &mut self.conn {
            Some(conn) => conn,
            None => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT));
                self.conn.insert(self.client.get_multiplexed_async_connection_with_config(&config).await?)
            }
        };
        let sent = pipe.query_async::<()>(conn).await;
        if sent.is_err() {
            self.conn = None;
        }
        sent
    }
}

/// Retry pacing and outage bookkeeping for a delivery task: waits double from
/// [`INITIAL_BACKOFF`] to [`MAX_BACKOFF`] while sends fail, and an outage is reported once.
#[derive(Debug)]
pub struct Retry {
    wait: Duration,
    /// Since when sends fail, and how many did.
    outage: Option<(Instant, u32)>,
}

impl Default for Retry {
    fn default() -> Self {
        Retry { wait: INITIAL_BACKOFF, outage: None }
    }
}

impl Retry {
    pub fn in_outage(&self) -> bool {
        self.outage.is_some()
    }

    /// A send worked: the outage it ends, if any (how long it lasted, failed attempts).
    pub fn succeeded(&mut self) -> Option<(Duration, u32)> {
        self.wait = INITIAL_BACKOFF;
        self.outage.take().map(|(since, failures)| (since.elapsed(), failures))
    }

    /// A send failed: whether this begins an outage (worth one warning), and how long to wait
    /// before the next try.
    pub fn failed(&mut self) -> (bool, Duration) {
        let wait = self.wait;
        self.wait = (self.wait * 2).min(MAX_BACKOFF);
        match &mut self.outage {
            None => {
                self.outage = Some((Instant::now(), 1));
                (true, wait)
            }
            Some((_, failures)) => {
                *failures += 1;
                (false, wait)
            }
        }
    }

    /// How long shutdown keeps trying: a few seconds, or one quick try during an outage.
    pub fn final_flush(&self) -> Duration {
        if self.in_outage() { FINAL_FLUSH_IN_OUTAGE } else { FINAL_FLUSH }
    }
}

/// Shutdown's last tries: sends the batches `next_batch` hands out until none is left or
/// `limit` has passed (a send still running then is cut off). What is left stays journaled.
pub async fn flush_before<B>(
    limit: Duration,
    mut next_batch: impl FnMut() -> Option<B>,
    mut send: impl AsyncFnMut(B) -> bool,
) {
    let deadline = Instant::now() + limit;
    while let Some(batch) = next_batch() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        if !tokio::time::timeout(left, send(batch)).await.unwrap_or(false) {
            tokio::time::sleep(Duration::from_millis(100).min(deadline.saturating_duration_since(Instant::now())))
                .await;
        }
    }
}

/// Sends batches of journal records as stream entries and broadcasts.
struct Sender {
    link: RedisLink,
    agent_id: String,
    format: EventFormat,
    broadcast_channel: String,
}

impl Sender {
    async fn send(&mut self, batch: &[Record]) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        let route = Route { format: self.format, agent_id: &self.agent_id, broadcast_channel: &self.broadcast_channel };
        let mut commands = 0;
        for record in batch {
            match self::commands(&route, record) {
                Ok(cmds) if cmds.is_empty() => {
                    tracing::debug!(seq = record.seq, name = %record.name, "event not sent in this format")
                }
                Ok(cmds) => {
                    for cmd in cmds {
                        pipe.add_command(cmd).ignore();
                        commands += 1;
                    }
                }
                // Counted as delivered: no manager of this format would take it.
                Err(err) => tracing::error!(seq = record.seq, error = %err, "event dropped"),
            }
        }
        if commands == 0 {
            return Ok(());
        }
        if commands > 1 {
            pipe.atomic();
        }
        self.link.run(&pipe).await
    }
}

/// Sends the outbox's backlog to Redis until `stop`, then tries briefly to send what is left.
pub(super) async fn run(
    shared: Arc<Shared>,
    notify: Arc<Notify>,
    target: RedisTarget,
    agent_id: String,
    format: EventFormat,
    broadcast_channel: String,
    stop: CancellationToken,
) {
    let client = match target.client() {
        Ok(client) => client,
        Err(err) => {
            tracing::error!(redis = %target.addr, %err, "cannot set up the Redis client; events stay in the journal");
            return;
        }
    };
    let mut sender = Sender { link: RedisLink::new(client), agent_id, format, broadcast_channel };
    let mut retry = Retry::default();
    loop {
        let batch = shared.peek(BATCH);
        if batch.is_empty() {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                () = notify.notified() => continue,
            }
        }
        // An XADD in flight is let finish (it is bounded by the timeouts): cutting it off could
        // send its events twice.
        match sender.send(&batch).await {
            Ok(()) => {
                shared.delivered(&batch);
                if let Some((down_for, failures)) = retry.succeeded() {
                    tracing::info!(
                        redis = %target.addr,
                        ?down_for,
                        failed_attempts = failures,
                        backlog = shared.stats.backlog(),
                        "Redis is reachable again; sending the event backlog in order"
                    );
                }
            }
            Err(err) => {
                let (begins, wait) = retry.failed();
                if begins {
                    tracing::warn!(
                        redis = %target.addr,
                        %err,
                        backlog = shared.stats.backlog(),
                        "cannot deliver events to Redis; they stay in the journal and are retried (logged once per outage)"
                    );
                } else {
                    tracing::debug!(redis = %target.addr, %err, retry_in = ?wait, "event delivery still failing");
                }
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }

    // Shutdown: whatever is left (agent_terminated at least) gets a last chance.
    let next = {
        let shared = shared.clone();
        move || Some(shared.peek(BATCH)).filter(|batch| !batch.is_empty())
    };
    let delivered = shared.clone();
    flush_before(retry.final_flush(), next, async move |batch: Vec<Record>| match sender.send(&batch).await {
        Ok(()) => {
            delivered.delivered(&batch);
            true
        }
        Err(_) => {
            sender.link.reset();
            false
        }
    })
    .await;
    let left = shared.stats.backlog();
    if left > 0 {
        tracing::warn!(
            backlog = left,
            "events not delivered at shutdown stay in the journal and go first at the next start"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    fn args_of(cmd: &Cmd) -> Vec<Vec<u8>> {
        cmd.args_iter()
            .map(|arg| match arg {
                redis::Arg::Simple(bytes) => bytes.to_vec(),
                _ => b"<not a plain argument>".to_vec(),
            })
            .collect()
    }

    #[test]
    fn xadd_matches_backend_ais_event_producer() {
        let args = super::super::pack_args(&[rmpv::Value::from("self-started")]);
        let record = Record { seq: 1, name: "agent_started".into(), timestamp: UNIX_EPOCH, args };
        let route = Route { format: EventFormat::Legacy, agent_id: "i-node1", broadcast_channel: "events_all" };
        let commands = commands(&route, &record).expect("renders");
        assert_eq!(commands.len(), 1, "≤ 25.x: one stream entry, nothing broadcast");
        let got = args_of(&commands[0]);
        let want: Vec<Vec<u8>> = [
            &b"XADD"[..],
            b"events",
            b"MAXLEN",
            b"~",
            b"128",
            b"*",
            b"name",
            b"agent_started",
            b"source",
            b"i-node1",
            b"args",
            // msgpack.packb(("self-started",)): a one-element array holding a str.
            b"\x91\xacself-started",
        ]
        .iter()
        .map(|part| part.to_vec())
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_cached_broadcast_is_set_then_published() {
        let task = "7c1d2e3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f";
        let args = super::super::pack_args(&[rmpv::Value::from(task), rmpv::Value::from("done")]);
        let record = Record { seq: 1, name: "bgtask_done".into(), timestamp: UNIX_EPOCH, args };
        let route = Route { format: EventFormat::Current, agent_id: "i-node1", broadcast_channel: "chan" };
        let commands: Vec<Vec<Vec<u8>>> = commands(&route, &record).expect("renders").iter().map(args_of).collect();
        assert_eq!(commands.len(), 2, "{commands:?}");
        let key = format!("bgtask.{task}").into_bytes();
        assert_eq!(&commands[0][..3], &[b"SET".to_vec(), key, commands[1][2].clone()]);
        assert_eq!(&commands[0][3..], &[b"EX".to_vec(), b"300".to_vec()]);
        assert_eq!(&commands[1][..2], &[b"PUBLISH".to_vec(), b"chan".to_vec()]);
    }

    #[test]
    fn the_client_selects_the_events_database() {
        let target = RedisTarget { addr: "127.0.0.1:6379".parse().expect("addr"), password: Some("pw".into()), db: 4 };
        let client = target.client().expect("client");
        let info = client.get_connection_info();
        assert_eq!(info.redis_settings().db(), 4);
        assert_eq!(info.redis_settings().password(), Some("pw"));
        assert_eq!(info.addr(), &ConnectionAddr::Tcp("127.0.0.1".into(), 6379));
    }
}
