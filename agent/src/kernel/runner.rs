//! The agent's end of one kernel's REPL: PUSH/PULL sockets to the runner's published ports, a
//! reader task that sorts what the runner sends into per-run output (capped, with a marker),
//! replies to side requests, and liveness; and the collection of one `execute` step.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use tokio::{sync::Notify, task::JoinHandle};
use zeromq::{PullSocket, PushSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// How long one connect attempt may take before it is retried.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(2);
/// How long a new connection's probe waits for its answer.
const PROBE_WAIT: Duration = Duration::from_millis(300);
/// How long a new connection probes before it is used anyway.
const SETTLE_BUDGET: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("the kernel runner at {addr} did not accept a connection within {waited:?}: {last}")]
    Connect { addr: String, waited: Duration, last: String },
    #[error("sending `{op}` to the kernel runner failed: {message}")]
    Send { op: String, message: String },
    #[error("the kernel runner did not answer `{op}` within {waited:?}")]
    NoReply { op: String, waited: Duration },
}

/// Limits every client of this agent works under (`[kernel-runner]`).
#[derive(Debug, Clone, Copy)]
pub struct RunnerLimits {
    pub output_limit: usize,
    pub response_timeout: Duration,
    pub connect_timeout: Duration,
}

/// A stream of console output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleKind {
    Stdout,
    Stderr,
    Media,
    Html,
    Log,
}

impl ConsoleKind {
    fn from_op(op: &[u8]) -> Option<ConsoleKind> {
        Some(match op {
            b"stdout" => ConsoleKind::Stdout,
            b"stderr" => ConsoleKind::Stderr,
            b"media" => ConsoleKind::Media,
            b"html" => ConsoleKind::Html,
            b"log" => ConsoleKind::Log,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConsoleKind::Stdout => "stdout",
            ConsoleKind::Stderr => "stderr",
            ConsoleKind::Media => "media",
            ConsoleKind::Html => "html",
            ConsoleKind::Log => "log",
        }
    }

    /// Streams whose consecutive pieces are one text (media and html items stay apart).
    fn merges(self) -> bool {
        matches!(self, ConsoleKind::Stdout | ConsoleKind::Stderr | ConsoleKind::Log)
    }
}

/// How a piece of a run ended, as the runner said it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepEnd {
    Finished,
    BuildFinished,
    CleanFinished,
    WaitingInput,
}

impl StepEnd {
    fn from_op(op: &[u8]) -> Option<StepEnd> {
        Some(match op {
            b"finished" => StepEnd::Finished,
            b"build-finished" => StepEnd::BuildFinished,
            b"clean-finished" => StepEnd::CleanFinished,
            b"waiting-input" => StepEnd::WaitingInput,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StepEnd::Finished => "finished",
            StepEnd::BuildFinished => "build-finished",
            StepEnd::CleanFinished => "clean-finished",
            StepEnd::WaitingInput => "waiting-input",
        }
    }
}

#[derive(Debug)]
enum Record {
    Console(ConsoleKind, BytesMut),
    End(StepEnd, Bytes),
}

/// What one `execute` step collected.
#[derive(Debug, Default)]
pub struct Collected {
    pub console: Vec<(ConsoleKind, Bytes)>,
    /// `None` when the flush timeout passed with the code still running (`continued`).
    pub end: Option<(StepEnd, Bytes)>,
    /// The runner stopped answering (`exec-timeout`).
    pub timed_out: bool,
}

/// Everything the reader task shares with requests.
struct Inbox {
    records: VecDeque<Record>,
    /// Console bytes accepted for the current run.
    run_bytes: usize,
    /// Console bytes dropped over the limit in the current run.
    dropped: u64,
    /// Runs given up (interrupted) whose `finished` has not come yet: their output is nobody's.
    abandoned: u32,
    last_heard: Instant,
    /// When the agent last sent something that needs an answer; silence counts from the later
    /// of this and `last_heard`.
    awaiting_since: Instant,
    probe_sent: Option<Instant>,
    /// `status` replies received so far.
    status_replies: u64,
    completions: VecDeque<Bytes>,
    service_results: VecDeque<Bytes>,
    apps_results: VecDeque<Bytes>,
}

struct Shared {
    inbox: Mutex<Inbox>,
    wake: Notify,
    limit: usize,
}

impl Shared {
    fn new(limit: usize) -> Shared {
        let now = Instant::now();
        Shared {
            inbox: Mutex::new(Inbox {
                records: VecDeque::new(),
                run_bytes: 0,
                dropped: 0,
                abandoned: 0,
                last_heard: now,
                awaiting_since: now,
                probe_sent: None,
                status_replies: 0,
                completions: VecDeque::new(),
                service_results: VecDeque::new(),
                apps_results: VecDeque::new(),
            }),
            wake: Notify::new(),
            limit,
        }
    }

    /// Waits until `ready` holds for the inbox or `deadline` passes; whether it held.
    async fn wait_until(&self, deadline: tokio::time::Instant, mut ready: impl FnMut(&mut Inbox) -> bool) -> bool {
        loop {
            let wake = self.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if ready(&mut self.lock()) {
                return true;
            }
            tokio::select! {
                () = &mut wake => {}
                () = tokio::time::sleep_until(deadline) => return ready(&mut self.lock()),
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inbox> {
        // A panic while holding the lock cannot leave the queues half-written; keep going.
        self.inbox.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Files one message from the runner.
    fn receive(&self, op: &[u8], payload: Bytes) {
        let mut inbox = self.lock();
        inbox.last_heard = Instant::now();
        inbox.probe_sent = None;
        if inbox.abandoned > 0 && (ConsoleKind::from_op(op).is_some() || StepEnd::from_op(op).is_some()) {
            if op == b"finished" {
                inbox.abandoned -= 1;
            }
            return;
        }
        if let Some(kind) = ConsoleKind::from_op(op) {
            inbox.push_console(kind, &payload, self.limit);
        } else if let Some(end) = StepEnd::from_op(op) {
            if end != StepEnd::WaitingInput && inbox.dropped > 0 {
                let note = format!(
                    "\n[bai-agent: {} more bytes of output were dropped over the {}-byte limit]\n",
                    inbox.dropped, self.limit
                );
                inbox.push_marker(note.as_bytes());
            }
            inbox.records.push_back(Record::End(end, payload));
        } else {
            match op {
                b"completion" => inbox.replies(ReplyKind::Completion).push_back(payload),
                b"service-result" => inbox.replies(ReplyKind::ServiceResult).push_back(payload),
                b"apps-result" => inbox.replies(ReplyKind::AppsResult).push_back(payload),
                b"status" => inbox.status_replies += 1,
                other => tracing::debug!(op = %String::from_utf8_lossy(other), "ignoring a runner message"),
            }
        }
        drop(inbox);
        self.wake.notify_waiters();
    }
}

impl Inbox {
    fn push_console(&mut self, kind: ConsoleKind, data: &[u8], limit: usize) {
        let room = limit.saturating_sub(self.run_bytes);
        let kept = &data[..data.len().min(room)];
        if kept.len() < data.len() {
            if self.dropped == 0 {
                self.run_bytes += kept.len();
                self.append(kind, kept);
                self.push_marker(
                    format!("\n[bai-agent: output truncated at {limit} bytes; the rest of this run is dropped]\n")
                        .as_bytes(),
                );
            }
            self.dropped += (data.len() - kept.len()) as u64;
            return;
        }
        self.run_bytes += kept.len();
        self.append(kind, kept);
    }

    fn push_marker(&mut self, note: &[u8]) {
        self.append(ConsoleKind::Stderr, note);
    }

    fn append(&mut self, kind: ConsoleKind, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if kind.merges()
            && let Some(Record::Console(last_kind, buf)) = self.records.back_mut()
            && *last_kind == kind
        {
            buf.extend_from_slice(data);
            return;
        }
        self.records.push_back(Record::Console(kind, BytesMut::from(data)));
    }

    /// Puts back the start of a stream a step could not hand out yet.
    fn push_front(&mut self, kind: ConsoleKind, data: Bytes) {
        if let Some(Record::Console(first_kind, buf)) = self.records.front_mut()
            && *first_kind == kind
        {
            let mut joined = BytesMut::from(&data[..]);
            joined.extend_from_slice(buf);
            *buf = joined;
            return;
        }
        self.records.push_front(Record::Console(kind, BytesMut::from(&data[..])));
    }

    /// Takes records up to and including the first end of a step.
    fn drain_step(&mut self, into: &mut Collected) -> bool {
        while let Some(record) = self.records.pop_front() {
            match record {
                Record::Console(kind, data) => {
                    let data = data.freeze();
                    match into.console.last_mut() {
                        Some((last, buf)) if *last == kind && kind.merges() => {
                            let mut joined = BytesMut::from(&buf[..]);
                            joined.extend_from_slice(&data);
                            *buf = joined.freeze();
                        }
                        _ => into.console.push((kind, data)),
                    }
                }
                Record::End(end, payload) => {
                    into.end = Some((end, payload));
                    return true;
                }
            }
        }
        false
    }
}

/// One kernel's REPL connection.
pub struct RunnerClient {
    addr: String,
    push: tokio::sync::Mutex<PushSocket>,
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
    limits: RunnerLimits,
    /// One `execute` step collects at a time.
    collecting: tokio::sync::Mutex<()>,
    /// One side request (completion, service) waits for its reply at a time.
    side_request: tokio::sync::Mutex<()>,
}

impl Drop for RunnerClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl RunnerClient {
    /// Connects to a runner whose PULL is published at `host:in_port` and PUSH at
    /// `host:out_port`, retrying while the container is still starting.
    pub async fn connect(host: &str, in_port: u16, out_port: u16, limits: RunnerLimits) -> Result<Self, RunnerError> {
        let started = Instant::now();
        let host = if host.contains(':') { format!("[{host}]") } else { host.to_owned() };
        let addr = format!("{host}:{in_port}/{out_port}");
        let mut pull = PullSocket::new();
        connect_with_retry(&mut pull, &format!("tcp://{host}:{out_port}"), started, limits.connect_timeout, &addr)
            .await?;
        let mut push = PushSocket::new();
        connect_with_retry(&mut push, &format!("tcp://{host}:{in_port}"), started, limits.connect_timeout, &addr)
            .await?;
        let shared = Arc::new(Shared::new(limits.output_limit));
        let reader = tokio::spawn(read_loop(pull, shared.clone()));
        tracing::debug!(%addr, elapsed = ?started.elapsed(), "connected to the kernel runner");
        let client = RunnerClient {
            addr,
            push: tokio::sync::Mutex::new(push),
            shared,
            reader,
            limits,
            collecting: tokio::sync::Mutex::new(()),
            side_request: tokio::sync::Mutex::new(()),
        };
        client.settle().await;
        Ok(client)
    }

    /// Makes sure the runner's replies come to this connection only. A runner whose previous
    /// agent died (kill -9) still has that agent's connection among its PUSH peers, and a PUSH
    /// socket deals messages round-robin: replies would go to the dead peer until a write to it
    /// fails. Probes go out one at a time until two in a row are answered, which cannot happen
    /// while a second peer takes every other message; the probes lost meanwhile are what
    /// retires the dead peer.
    async fn settle(&self) {
        let started = Instant::now();
        let mut answered_in_a_row = 0;
        while answered_in_a_row < 2 && started.elapsed() < SETTLE_BUDGET {
            let before = self.shared.lock().status_replies;
            if self.send("status", Bytes::new()).await.is_err() {
                return;
            }
            let deadline = tokio::time::Instant::now() + PROBE_WAIT;
            let answered = self.shared.wait_until(deadline, |inbox| inbox.status_replies > before).await;
            answered_in_a_row = if answered { answered_in_a_row + 1 } else { 0 };
        }
        if answered_in_a_row < 2 {
            tracing::warn!(addr = %self.addr, "the kernel runner does not answer status probes; using it anyway");
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Sends one `[op, payload]` message.
    pub async fn send(&self, op: &str, payload: impl Into<Bytes>) -> Result<(), RunnerError> {
        let frames = vec![Bytes::copy_from_slice(op.as_bytes()), payload.into()];
        let message = ZmqMessage::try_from(frames)
            .map_err(|err| RunnerError::Send { op: op.to_owned(), message: err.to_string() })?;
        let mut push = self.push.lock().await;
        match tokio::time::timeout(self.limits.response_timeout, push.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(RunnerError::Send { op: op.to_owned(), message: err.to_string() }),
            Err(_) => Err(RunnerError::NoReply { op: op.to_owned(), waited: self.limits.response_timeout }),
        }
    }

    /// Starts counting output toward the limit afresh (a new query or batch run).
    pub fn begin_run(&self) {
        let mut inbox = self.shared.lock();
        inbox.run_bytes = 0;
        inbox.dropped = 0;
        // Whatever an abandoned run left behind belongs to no one now.
        inbox.records.clear();
        drop(inbox);
        self.awaiting_reply();
    }

    /// Gives up the current run: what it still sends, up to its `finished`, is discarded.
    pub fn abandon_run(&self) {
        let mut inbox = self.shared.lock();
        let already_ended = inbox.records.iter().any(|r| matches!(r, Record::End(StepEnd::Finished, _)));
        inbox.records.clear();
        if !already_ended {
            inbox.abandoned += 1;
        }
    }

    /// The runner owes an answer from now on (code, input or a batch was sent).
    pub fn awaiting_reply(&self) {
        let mut inbox = self.shared.lock();
        inbox.awaiting_since = Instant::now();
        inbox.probe_sent = None;
    }

    /// Collects output until a step ends, `flush` passes (`None` waits for the end), or the
    /// runner stops answering. Output ending inside a UTF-8 character keeps that character
    /// for the next step.
    pub async fn collect(&self, flush: Option<Duration>) -> Collected {
        let _one_at_a_time = self.collecting.lock().await;
        let deadline = flush.map(|flush| tokio::time::Instant::now() + flush);
        let mut collected = Collected::default();
        loop {
            let wake = self.shared.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            let (done, silent, probe_due) = {
                let mut inbox = self.shared.lock();
                let done = inbox.drain_step(&mut collected);
                let silent = inbox.last_heard.max(inbox.awaiting_since).elapsed();
                let probe_due = inbox.probe_sent.is_none() && silent >= self.limits.response_timeout / 2;
                if probe_due {
                    inbox.probe_sent = Some(Instant::now());
                }
                (done, silent, probe_due)
            };
            if done {
                return collected;
            }
            if silent >= self.limits.response_timeout {
                collected.timed_out = true;
                return collected;
            }
            if probe_due && let Err(err) = self.send("status", Bytes::new()).await {
                tracing::debug!(addr = %self.addr, error = %err, "liveness probe not sent");
            }
            let silence_deadline =
                tokio::time::Instant::now() + self.limits.response_timeout.saturating_sub(silent) / 2;
            let wait_until = match deadline {
                Some(deadline) => deadline.min(silence_deadline),
                None => silence_deadline,
            };
            tokio::select! {
                () = &mut wake => {}
                () = tokio::time::sleep_until(wait_until) => {
                    if deadline.is_some_and(|deadline| tokio::time::Instant::now() >= deadline) {
                        let mut inbox = self.shared.lock();
                        inbox.drain_step(&mut collected);
                        if collected.end.is_none() {
                            hold_back_partial_character(&mut collected, &mut inbox);
                        }
                        return collected;
                    }
                }
            }
        }
    }

    /// Sends `op` and waits for its reply of kind `reply`.
    pub async fn request(
        &self,
        op: &str,
        payload: impl Into<Bytes>,
        reply: ReplyKind,
        wait: Duration,
    ) -> Result<Bytes, RunnerError> {
        let _one_at_a_time = self.side_request.lock().await;
        self.shared.lock().replies(reply).clear();
        self.send(op, payload).await?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut answer = None;
        self.shared
            .wait_until(deadline, |inbox| {
                answer = inbox.replies(reply).pop_front();
                answer.is_some()
            })
            .await;
        answer.ok_or_else(|| RunnerError::NoReply { op: op.to_owned(), waited: wait })
    }
}

/// Replies to side requests, each kept in its own queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    Completion,
    ServiceResult,
    AppsResult,
}

impl Inbox {
    fn replies(&mut self, kind: ReplyKind) -> &mut VecDeque<Bytes> {
        match kind {
            ReplyKind::Completion => &mut self.completions,
            ReplyKind::ServiceResult => &mut self.service_results,
            ReplyKind::AppsResult => &mut self.apps_results,
        }
    }
}

/// A step cut by the flush timeout may end inside a multi-byte character; the partial
/// character waits for the next step so text stays text.
fn hold_back_partial_character(collected: &mut Collected, inbox: &mut Inbox) {
    let Some((kind, data)) = collected.console.last_mut() else { return };
    if !kind.merges() {
        return;
    }
    let cut = incomplete_utf8_tail(data);
    if cut == 0 {
        return;
    }
    let tail = data.split_off(data.len() - cut);
    let kind = *kind;
    if data.is_empty() {
        collected.console.pop();
    }
    inbox.push_front(kind, tail);
}

/// Length of an unfinished UTF-8 sequence at the end of `data` (0 when it ends cleanly or
/// the bytes are not UTF-8 anyway).
fn incomplete_utf8_tail(data: &[u8]) -> usize {
    let start = data.len().saturating_sub(3);
    for i in (start..data.len()).rev() {
        let byte = data[i];
        if byte & 0xC0 == 0x80 {
            continue;
        }
        let needed = match byte {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return 0,
        };
        let have = data.len() - i;
        return if have < needed && std::str::from_utf8(&data[..i]).is_ok() { have } else { 0 };
    }
    0
}

async fn connect_with_retry(
    socket: &mut impl Socket,
    endpoint: &str,
    started: Instant,
    budget: Duration,
    addr: &str,
) -> Result<(), RunnerError> {
    let mut last = String::from("no attempt");
    let mut pause = Duration::from_millis(20);
    while started.elapsed() < budget {
        match tokio::time::timeout(CONNECT_ATTEMPT, socket.connect(endpoint)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(err)) => last = err.to_string(),
            Err(_) => last = format!("no handshake within {CONNECT_ATTEMPT:?}"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
    Err(RunnerError::Connect { addr: addr.to_owned(), waited: started.elapsed(), last })
}

async fn read_loop(mut pull: PullSocket, shared: Arc<Shared>) {
    loop {
        let message = match pull.recv().await {
            Ok(message) => message,
            Err(err) => {
                tracing::debug!(%err, "kernel runner receive error");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let frames = message.into_vec();
        let [op, payload] = <[Bytes; 2]>::try_from(frames).unwrap_or_else(|frames| {
            tracing::debug!(frames = frames.len(), "dropping a runner message that is not [op, payload]");
            [Bytes::new(), Bytes::new()]
        });
        if !op.is_empty() {
            shared.receive(&op, payload);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(limit: usize) -> Shared {
        Shared::new(limit)
    }

    fn step(shared: &Shared) -> Collected {
        let mut collected = Collected::default();
        shared.lock().drain_step(&mut collected);
        collected
    }

    #[test]
    fn consecutive_output_merges_and_order_is_kept() {
        let shared = shared(1 << 20);
        shared.receive(b"stdout", Bytes::from_static(b"a"));
        shared.receive(b"stdout", Bytes::from_static(b"b"));
        shared.receive(b"stderr", Bytes::from_static(b"E"));
        shared.receive(b"stdout", Bytes::from_static(b"c"));
        shared.receive(b"finished", Bytes::from_static(b"{\"exitCode\": 0}"));
        shared.receive(b"stdout", Bytes::from_static(b"next"));
        let collected = step(&shared);
        let console: Vec<(&str, &[u8])> = collected.console.iter().map(|(k, d)| (k.as_str(), &d[..])).collect();
        assert_eq!(console, vec![("stdout", &b"ab"[..]), ("stderr", b"E"), ("stdout", b"c")]);
        assert_eq!(collected.end.map(|(end, _)| end), Some(StepEnd::Finished));
        assert_eq!(step(&shared).console.len(), 1, "the next step's output stays queued");
    }

    #[test]
    fn output_over_the_limit_is_dropped_with_markers() {
        let shared = shared(1024);
        for _ in 0..100 {
            shared.receive(b"stdout", Bytes::from(vec![b'x'; 100]));
        }
        shared.receive(b"finished", Bytes::from_static(b"{\"exitCode\": 0}"));
        let collected = step(&shared);
        let stdout: usize =
            collected.console.iter().filter(|(k, _)| *k == ConsoleKind::Stdout).map(|(_, d)| d.len()).sum();
        assert_eq!(stdout, 1024);
        let stderr: Vec<u8> =
            collected.console.iter().filter(|(k, _)| *k == ConsoleKind::Stderr).flat_map(|(_, d)| d.to_vec()).collect();
        let stderr = String::from_utf8_lossy(&stderr);
        assert!(stderr.contains("output truncated at 1024 bytes"), "{stderr}");
        assert!(stderr.contains(&format!("{} more bytes", 100 * 100 - 1024)), "{stderr}");
        assert!(shared.lock().records.is_empty());
    }

    #[test]
    fn an_abandoned_run_leaves_nothing_for_the_next() {
        let shared = shared(1 << 20);
        shared.receive(b"stdout", Bytes::from_static(b"old"));
        shared.lock().records.clear();
        shared.lock().abandoned = 1;
        shared.receive(b"stdout", Bytes::from_static(b"more old"));
        shared.receive(b"finished", Bytes::from_static(b"{\"exitCode\": 130}"));
        shared.receive(b"stdout", Bytes::from_static(b"new"));
        shared.receive(b"finished", Bytes::from_static(b"{\"exitCode\": 0}"));
        let collected = step(&shared);
        assert_eq!(&collected.console[0].1[..], b"new");
        assert_eq!(collected.console.len(), 1);
        assert!(collected.end.is_some());
    }

    #[test]
    fn partial_characters_wait_for_the_next_step() {
        assert_eq!(incomplete_utf8_tail("héllo".as_bytes()), 0);
        assert_eq!(incomplete_utf8_tail(&"é".as_bytes()[..1]), 1);
        assert_eq!(incomplete_utf8_tail(&"a€".as_bytes()[..3]), 2);
        assert_eq!(incomplete_utf8_tail(b"\xff\xfe"), 0, "not UTF-8: passed through as is");
        let shared = shared(1 << 20);
        let euro = "€".as_bytes();
        shared.receive(b"stdout", Bytes::from([b"price: ", &euro[..1]].concat()));
        let mut collected = step(&shared);
        hold_back_partial_character(&mut collected, &mut shared.lock());
        assert_eq!(&collected.console[0].1[..], b"price: ");
        shared.receive(b"stdout", Bytes::copy_from_slice(&euro[1..]));
        let collected = step(&shared);
        assert_eq!(&collected.console[0].1[..], euro);
    }
}
