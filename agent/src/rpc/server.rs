//! The RPC server: a ZeroMQ ROUTER on `agent.rpc-listen-addr` speaking callosum's framing,
//! the PING/PONG keepalive, per-order-key scheduling, cancellation and graceful shutdown.
//!
//! Frames on the ROUTER side (callosum `lower/zeromq.py`): a DEALER sends
//! `[b"PING", b"", b""]` once on connect and `[b"UPPER", header, body]` per message; the
//! ROUTER sees each with the peer's identity in front and answers `[peer, b"PONG", header,
//! body]` (the PING's own empty frames echoed) and `[peer, b"UPPER", header, body]`.
//!
//! Scheduling: requests of one connection with the same order key (`okey`) run one after
//! another in arrival order; other keys, and other connections, run concurrently. Each key
//! has a queue that exists only while one of its requests runs. A bad request gets a FAILURE
//! reply when its header names a reply address (method, okey, seq), else a warning; nothing
//! a peer sends stops the server.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::task::{self, JoinSet};
use tokio_util::sync::CancellationToken;
use zeromq::{RouterSendHalf, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::metrics::rpc::{Outcome, RpcMetrics, method_label};

use super::{
    codec::{self, Header, Message, MessageType, Payload, RpcError},
    methods::{Args, MethodError, Methods},
};

/// Frame type of a callosum RPC message.
pub const UPPER: &[u8] = b"UPPER";
/// Frame type of the keepalive a client sends on connect, and of its answer.
pub const PING: &[u8] = b"PING";
pub const PONG: &[u8] = b"PONG";

/// Requests queued or running at once, over all connections; more get an immediate FAILURE.
pub const MAX_IN_FLIGHT: usize = 4096;
/// A reply a peer does not take within this long (its connection stalled) is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// On shutdown, running requests are cancelled and get this long to send their CANCELLED.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A bound, not yet serving, RPC socket.
pub struct RpcServer {
    socket: RouterSocket,
    local_addr: SocketAddr,
}

impl RpcServer {
    /// Binds the ROUTER socket (`tcp://addr`); port 0 picks a free port.
    pub async fn bind(addr: SocketAddr) -> Result<RpcServer, RpcError> {
        let mut socket = RouterSocket::new();
        let endpoint = socket
            .bind(&format!("tcp://{addr}"))
            .await
            .map_err(|source| RpcError::Bind { addr, source: Box::new(source) })?;
        let local_addr = match endpoint {
            zeromq::Endpoint::Tcp(_, port) => SocketAddr::new(addr.ip(), port),
            _ => addr,
        };
        Ok(RpcServer { socket, local_addr })
    }

    /// The address actually bound (the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` is cancelled, then cancels running requests, lets them answer
    /// CANCELLED for a moment, and closes the socket.
    pub async fn serve(
        self,
        methods: Arc<Methods>,
        metrics: RpcMetrics,
        shutdown: CancellationToken,
    ) -> Result<(), RpcError> {
        let (sender, mut receiver) = self.socket.split();
        tracing::info!(addr = %self.local_addr, "RPC server listening (callosum over ZeroMQ)");
        let mut scheduler = Scheduler::new(sender, methods, metrics, shutdown.child_token());
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some(joined) = scheduler.tasks.join_next_with_id() => scheduler.finished(joined),
                received = receiver.recv() => match received {
                    Ok(frames) => scheduler.handle(frames),
                    Err(err) => {
                        // A peer's broken connection surfaces here; the socket itself lives on.
                        tracing::debug!(%err, "RPC receive error");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
            }
        }
        scheduler.drain().await;
        tracing::info!("RPC server stopped");
        Ok(())
    }
}

/// Requests of one order key on one connection share a queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct QueueKey {
    peer: Bytes,
    order_key: Vec<u8>,
}

/// What a CANCEL names: callosum's request id `(method, okey, seq)` on one connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RequestId {
    queue: QueueKey,
    method: String,
    seq: u64,
}

struct Job {
    peer: Bytes,
    header: Header,
    args: Result<Args, MethodError>,
    cancel: CancellationToken,
    id: RequestId,
    arrived: Instant,
}

struct Scheduler {
    sender: RouterSendHalf,
    methods: Arc<Methods>,
    metrics: RpcMetrics,
    /// Cancelled on shutdown; every request's token is a child.
    cancel_all: CancellationToken,
    tasks: JoinSet<()>,
    /// Running task → the request it runs.
    running: HashMap<task::Id, RequestId>,
    /// A key is present while one of its requests runs; the deque holds those waiting.
    queues: HashMap<QueueKey, VecDeque<Job>>,
    /// Queued and running requests, for CANCEL.
    cancels: HashMap<RequestId, CancellationToken>,
}

impl Scheduler {
    fn new(sender: RouterSendHalf, methods: Arc<Methods>, metrics: RpcMetrics, cancel_all: CancellationToken) -> Self {
        Scheduler {
            sender,
            methods,
            metrics,
            cancel_all,
            tasks: JoinSet::new(),
            running: HashMap::new(),
            queues: HashMap::new(),
            cancels: HashMap::new(),
        }
    }

    /// One multipart message from the ROUTER: `[peer, type, header, body]`.
    fn handle(&mut self, message: ZmqMessage) {
        let mut frames = message.into_vecdeque();
        let Some(peer) = frames.pop_front() else {
            return;
        };
        let frames: Vec<Bytes> = frames.into();
        match frames.as_slice() {
            [kind, header, body] if kind.as_ref() == PING => {
                tracing::debug!(peer = %peer_label(&peer), "RPC keepalive PING");
                self.send_later(vec![peer, Bytes::from_static(PONG), header.clone(), body.clone()]);
            }
            [kind, header, body] if kind.as_ref() == UPPER => self.handle_upper(peer, header, body),
            [kind, _, _] => tracing::warn!(
                peer = %peer_label(&peer),
                "dropping an RPC message of unknown frame type {:?} (expected UPPER or PING)",
                String::from_utf8_lossy(&kind[..kind.len().min(32)])
            ),
            _ => tracing::warn!(
                peer = %peer_label(&peer),
                "dropping an RPC message of {} frames (callosum sends 3: type, header, body)",
                frames.len()
            ),
        }
    }

    fn handle_upper(&mut self, peer: Bytes, header: &[u8], body: &[u8]) {
        let header = match codec::decode_header(header) {
            Ok(header) => header,
            Err(err) => {
                tracing::warn!(peer = %peer_label(&peer), "dropping an RPC message with no reply address: {err}");
                return;
            }
        };
        let queue = QueueKey { peer: peer.clone(), order_key: codec::pack(&header.order_key).unwrap_or_default() };
        let id = RequestId { queue, method: header.method.clone(), seq: header.seq };
        match header.kind {
            MessageType::Function => {
                let args = match codec::decode_body(&header, body) {
                    Ok(Payload::Value(payload)) => Args::from_payload(&header.method, payload),
                    Ok(_) => Err(MethodError::Request(format!("{}: a request carries no value", header.method))),
                    Err(err) => Err(MethodError::Request(format!("{}: malformed request: {err}", header.method))),
                };
                if self.cancels.len() >= MAX_IN_FLIGHT {
                    let error = MethodError::Failed {
                        method: header.method.clone(),
                        message: format!("the agent has {MAX_IN_FLIGHT} requests in flight; try again later"),
                    };
                    self.reply_later(&peer, &Message::failure(&header, error.to_error_info(&header.method)));
                    return;
                }
                tracing::debug!(peer = %peer_label(&peer), method = %header.method, seq = header.seq, "RPC request");
                let cancel = self.cancel_all.child_token();
                self.cancels.insert(id.clone(), cancel.clone());
                let job = Job { peer, header, args, cancel, id, arrived: Instant::now() };
                match self.queues.get_mut(&job.id.queue) {
                    Some(waiting) => waiting.push_back(job),
                    None => {
                        self.queues.insert(job.id.queue.clone(), VecDeque::new());
                        self.start(job);
                    }
                }
            }
            MessageType::Cancel => match self.cancels.get(&id) {
                Some(token) => {
                    tracing::debug!(method = %header.method, seq = header.seq, "RPC request cancelled by the client");
                    token.cancel();
                }
                None => tracing::debug!(method = %header.method, seq = header.seq, "CANCEL of an unknown request"),
            },
            other => tracing::debug!(
                peer = %peer_label(&peer),
                method = %header.method,
                "ignoring a {other:?} message: this agent makes no calls of its own"
            ),
        }
    }

    fn start(&mut self, job: Job) {
        let id = job.id.clone();
        let methods = self.methods.clone();
        let sender = self.sender.clone();
        let handle = self.tasks.spawn(run_job(job, methods, sender, self.metrics.clone()));
        self.running.insert(handle.id(), id);
    }

    /// A request finished (or its task panicked): start the next of its key.
    fn finished(&mut self, joined: Result<(task::Id, ()), task::JoinError>) {
        let task_id = match joined {
            Ok((task_id, ())) => task_id,
            Err(err) => {
                if err.is_panic() {
                    tracing::error!(%err, "an RPC method panicked; the request got no reply");
                }
                err.id()
            }
        };
        let Some(id) = self.running.remove(&task_id) else {
            return;
        };
        self.cancels.remove(&id);
        let next = self.queues.get_mut(&id.queue).and_then(VecDeque::pop_front);
        match next {
            Some(job) => self.start(job),
            None => {
                self.queues.remove(&id.queue);
            }
        }
    }

    fn reply_later(&self, peer: &Bytes, message: &Message) {
        match message.encode() {
            Ok((header, body)) => {
                self.send_later(vec![peer.clone(), Bytes::from_static(UPPER), header.into(), body.into()]);
            }
            Err(err) => tracing::warn!("cannot encode an RPC reply: {err}"),
        }
    }

    /// Sends from a task of its own, so a stalled peer never holds up the receive loop.
    fn send_later(&self, frames: Vec<Bytes>) {
        let mut sender = self.sender.clone();
        tokio::spawn(async move { send(&mut sender, frames).await });
    }

    /// Shutdown: cancel everything, give running requests a moment to answer, stop the rest.
    async fn drain(mut self) {
        self.cancel_all.cancel();
        self.queues.clear();
        let drained =
            tokio::time::timeout(DRAIN_TIMEOUT, async { while self.tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!("{} RPC requests did not finish within {DRAIN_TIMEOUT:?} of shutdown", self.tasks.len());
            self.tasks.shutdown().await;
        }
    }
}

/// Runs one request and sends its reply: RESULT, FAILURE, or CANCELLED when the client
/// cancelled it or the agent is shutting down.
async fn run_job(job: Job, methods: Arc<Methods>, mut sender: RouterSendHalf, metrics: RpcMetrics) {
    let Job { peer, header, args, cancel, arrived, .. } = job;
    let method = method_label(&header.method, Methods::knows(&header.method));
    let reply = if cancel.is_cancelled() {
        metrics.observe(method, Outcome::cancelled, arrived.elapsed());
        Message::cancelled(&header)
    } else {
        let outcome = tokio::select! {
            biased;
            () = cancel.cancelled() => None,
            outcome = async {
                match args {
                    Ok(args) => methods.dispatch(&header.method, args).await,
                    Err(err) => Err(err),
                }
            } => Some(outcome),
        };
        let counted = match &outcome {
            None => Outcome::cancelled,
            Some(Ok(_)) => Outcome::result,
            Some(Err(_)) => Outcome::failure,
        };
        metrics.observe(method, counted, arrived.elapsed());
        match outcome {
            None => Message::cancelled(&header),
            Some(Ok(value)) => Message::result(&header, value),
            Some(Err(err)) => {
                tracing::info!(method = %header.method, seq = header.seq, "RPC FAILURE: {err}");
                Message::failure(&header, err.to_error_info(&header.method))
            }
        }
    };
    let encoded = match reply.encode() {
        Ok(encoded) => encoded,
        Err(err) => {
            tracing::warn!(method = %header.method, "cannot encode the reply: {err}");
            let error = MethodError::Failed {
                method: header.method.clone(),
                message: format!("cannot encode the result: {err}"),
            };
            match Message::failure(&header, error.to_error_info(&header.method)).encode() {
                Ok(encoded) => encoded,
                Err(_) => return,
            }
        }
    };
    send(&mut sender, vec![peer, Bytes::from_static(UPPER), encoded.0.into(), encoded.1.into()]).await;
}

async fn send(sender: &mut RouterSendHalf, frames: Vec<Bytes>) {
    let peer = frames.first().map(|p| peer_label(p)).unwrap_or_default();
    let Ok(message) = ZmqMessage::try_from(frames) else {
        return;
    };
    match tokio::time::timeout(SEND_TIMEOUT, sender.send(message)).await {
        Ok(Ok(())) => {}
        // The peer left before its reply was ready: nothing to do.
        Ok(Err(err)) => tracing::debug!(%peer, %err, "RPC reply not delivered"),
        Err(_) => tracing::warn!(%peer, "RPC reply dropped: the peer took none for {SEND_TIMEOUT:?}"),
    }
}

/// A peer identity for logs: hex, shortened.
fn peer_label(peer: &[u8]) -> String {
    peer.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use rmpv::Value;

    use super::*;
    use crate::{config::Config, rpc::client::RpcClient};

    async fn start() -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<Result<(), RpcError>>) {
        let server = RpcServer::bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);
        let shutdown = CancellationToken::new();
        let methods = Arc::new(Methods::new(Config::default()));
        let handle = tokio::spawn(server.serve(methods, RpcMetrics::default(), shutdown.clone()));
        (addr, shutdown, handle)
    }

    #[tokio::test]
    async fn serves_the_rust_client_and_stops_on_the_token() {
        let (addr, shutdown, handle) = start().await;
        let client = RpcClient::connect(&addr.to_string()).await.expect("connect");
        let pong = client.call("ping", vec![Value::from("hi")], vec![]).await.expect("ping");
        assert_eq!(pong, Value::from("hi"));
        let err = client.call("nope", vec![], vec![]).await.expect_err("unknown method");
        assert!(err.to_string().contains("unknown method `nope`"), "{err}");
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), handle).await.expect("stops").expect("joins").expect("ok");
    }

    #[tokio::test]
    async fn a_second_bind_on_the_same_port_fails() {
        let (addr, shutdown, _handle) = start().await;
        let err = RpcServer::bind(addr).await.err().expect("port taken");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        shutdown.cancel();
    }
}
