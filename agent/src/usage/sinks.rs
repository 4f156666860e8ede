//! Where usage records go, each sink with its own delivery task and journal marker:
//!
//! - **redis**: `XADD {usage.stream} MINID ~ {now - retention} * event <CloudEvent JSON>` in
//!   `redis.events-db`, a batch in one `MULTI`/`EXEC`;
//! - **http**: `POST {usage.http-endpoint}` with a JSON array of CloudEvents
//!   (`Content-Type: application/cloudevents-batch+json`); any 2xx confirms the batch.
//!
//! A sink that fails is retried with backoff (100 ms doubling to 10 s), one warning per
//! outage; records wait in the journal meanwhile and go out in journal order (so in order per
//! kernel). A record is marked delivered to a sink only after the sink confirmed it, so an
//! agent that dies in between sends it again: delivery is at least once, and a consumer
//! dedupes by the CloudEvent `id`.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::events::{
    RedisLink, RedisTarget,
    delivery::{Retry, flush_before},
};

/// Records per delivery.
pub const BATCH: usize = 64;

/// A record waiting for a sink.
#[derive(Debug, Clone)]
pub struct Pending {
    pub seq: u64,
    /// The CloudEvent, as JSON.
    pub json: Arc<str>,
    /// When the record was made (its window's end), for the backlog's age.
    pub made: SystemTime,
}

/// One place records go.
pub enum Sink {
    Redis { link: Box<RedisLink>, target: RedisTarget, stream: String, retention: Duration },
    Http { client: reqwest::Client, endpoint: String, token: Option<String> },
}

impl Sink {
    pub fn redis(target: RedisTarget, stream: String, retention: Duration) -> redis::RedisResult<Sink> {
        Ok(Sink::Redis { link: Box::new(RedisLink::new(target.client()?)), target, stream, retention })
    }

    pub fn http(endpoint: String, token: Option<String>, timeout: Duration) -> Result<Sink, String> {
        crate::config::check_usage_endpoint(&endpoint)?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(3)))
            .build()
            .map_err(|err| err.to_string())?;
        Ok(Sink::Http { client, endpoint, token })
    }

    /// The sink's name: its marker file and its metrics label.
    pub fn name(&self) -> &'static str {
        match self {
            Sink::Redis { .. } => "redis",
            Sink::Http { .. } => "http",
        }
    }

    /// Where it sends, for log lines.
    pub fn target(&self) -> String {
        match self {
            Sink::Redis { target, stream, .. } => format!("redis {} db {} stream {stream}", target.addr, target.db),
            Sink::Http { endpoint, .. } => endpoint.clone(),
        }
    }

    /// Sends `batch`; Ok once the sink confirmed all of it.
    pub async fn send(&mut self, batch: &[Pending]) -> Result<(), String> {
        match self {
            Sink::Redis { link, stream, retention, .. } => {
                let mut pipe = redis::pipe();
                if batch.len() > 1 {
                    pipe.atomic();
                }
                let min_id = (!retention.is_zero()).then(|| {
                    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
                    now.saturating_sub(*retention).as_millis()
                });
                for record in batch {
                    let mut cmd = redis::cmd("XADD");
                    cmd.arg(stream.as_str());
                    if let Some(min_id) = min_id {
                        cmd.arg("MINID").arg("~").arg(min_id.to_string());
                    }
                    cmd.arg("*").arg("event").arg(record.json.as_bytes());
                    pipe.add_command(cmd).ignore();
                }
                link.run(&pipe).await.map_err(|err| err.to_string())
            }
            Sink::Http { client, endpoint, token } => {
                let mut body = Vec::with_capacity(batch.iter().map(|r| r.json.len() + 1).sum::<usize>() + 2);
                body.push(b'[');
                for (i, record) in batch.iter().enumerate() {
                    if i > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(record.json.as_bytes());
                }
                body.push(b']');
                let mut request = client
                    .post(endpoint.as_str())
                    .header(reqwest::header::CONTENT_TYPE, "application/cloudevents-batch+json")
                    .body(body);
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                let response = request.send().await.map_err(|err| error_chain(&err))?;
                let status = response.status();
                if status.is_success() {
                    return Ok(());
                }
                let text = response.text().await.unwrap_or_default();
                Err(format!("{status}: {}", text.chars().take(200).collect::<String>().trim()))
            }
        }
    }
}

/// An error with its causes (reqwest's own message hides "connection refused").
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Sends sink `index`'s backlog until `stop`, then tries briefly to send what is left.
pub(super) async fn deliver(
    shared: Arc<Shared>,
    index: usize,
    mut sink: Sink,
    notify: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut retry = Retry::default();
    loop {
        let batch = shared.peek(index, BATCH);
        if batch.is_empty() {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                () = notify.notified() => continue,
            }
        }
        // A send in flight is let finish (it is bounded by timeouts): cutting it off could
        // deliver its records twice.
        match sink.send(&batch).await {
            Ok(()) => {
                shared.delivered(index, &batch);
                if let Some((down_for, failures)) = retry.succeeded() {
                    tracing::info!(
                        sink = sink.name(),
                        target = %sink.target(),
                        ?down_for,
                        failed_attempts = failures,
                        backlog = shared.backlog(index).0,
                        "the usage sink is reachable again; sending the backlog in order"
                    );
                }
            }
            Err(err) => {
                shared.stats.failures[index].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let (begins, wait) = retry.failed();
                if begins {
                    tracing::warn!(
                        sink = sink.name(),
                        target = %sink.target(),
                        error = %err,
                        backlog = shared.backlog(index).0,
                        "cannot deliver usage records; they stay in the journal and are retried (logged once per outage)"
                    );
                } else {
                    tracing::debug!(sink = sink.name(), error = %err, retry_in = ?wait, "usage delivery still failing");
                }
                tokio::select! {
                    biased;
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }

    let target = sink.name();
    let next = {
        let shared = shared.clone();
        move || Some(shared.peek(index, BATCH)).filter(|batch| !batch.is_empty())
    };
    let delivered = shared.clone();
    flush_before(retry.final_flush(), next, async move |batch: Vec<Pending>| {
        let sent = sink.send(&batch).await.is_ok();
        if sent {
            delivered.delivered(index, &batch);
        }
        sent
    })
    .await;
    let (left, _) = shared.backlog(index);
    if left > 0 {
        tracing::warn!(
            sink = target,
            backlog = left,
            "usage records not delivered at shutdown stay in the journal and go first at the next start"
        );
    }
}
