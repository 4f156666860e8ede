//! The RPC client (a ZeroMQ DEALER speaking callosum, as Backend.AI's manager does): connect
//! with the PING/PONG handshake, then concurrent calls matched to replies by sequence number.
//! Used by `bai-agentctl` and the tests.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use rmpv::Value;
use tokio::{sync::oneshot, task::JoinHandle};
use zeromq::{DealerRecvHalf, DealerSendHalf, DealerSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use super::{
    codec::{ErrorInfo, Message, MessageType, Payload, RpcError},
    server::{PING, PONG, UPPER},
};

/// How long the connection and its PING/PONG handshake may take (callosum's default).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a call waits for its reply unless told otherwise.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// callosum numbers requests modulo 2^32.
const SEQ_MODULO: u64 = 1 << 32;

#[derive(Debug, thiserror::Error)]
pub enum RpcClientError {
    #[error("cannot connect to the agent at {addr}: {source}")]
    Connect { addr: String, source: Box<zeromq::ZmqError> },
    #[error("the agent at {addr} did not answer the PING handshake within {HANDSHAKE_TIMEOUT:?}")]
    Handshake { addr: String },
    #[error("the agent at {addr} answered the PING handshake with {got:?} instead of PONG")]
    BadHandshake { addr: String, got: String },
    #[error("cannot send `{method}`: {source}")]
    Send { method: String, source: Box<zeromq::ZmqError> },
    #[error(transparent)]
    Codec(#[from] RpcError),
    #[error("`{method}` got no reply within {after:?}")]
    Timeout { method: String, after: Duration },
    /// The method raised on the agent (callosum FAILURE).
    #[error("`{method}` failed on the agent: {}: {}", error.name, error.message())]
    Failure { method: String, error: ErrorInfo },
    /// The RPC machinery on the agent failed (callosum ERROR).
    #[error("`{method}` hit an internal error on the agent: {}: {}", error.name, error.message())]
    Internal { method: String, error: ErrorInfo },
    #[error("`{method}` was cancelled by the agent")]
    Cancelled { method: String },
    #[error("the connection to the agent is closed")]
    Closed,
}

impl RpcClientError {
    /// The remote error of a FAILURE or ERROR reply.
    pub fn remote(&self) -> Option<&ErrorInfo> {
        match self {
            RpcClientError::Failure { error, .. } | RpcClientError::Internal { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// How one call is made.
#[derive(Debug, Clone)]
pub struct CallOptions {
    /// Calls with the same key on one connection run in order on the agent; Backend.AI's
    /// manager uses `""`.
    pub order_key: Value,
    pub timeout: Duration,
    /// Snappy-compress the request (callosum's default).
    pub zip: bool,
}

impl Default for CallOptions {
    fn default() -> Self {
        CallOptions { order_key: Value::from(""), timeout: DEFAULT_CALL_TIMEOUT, zip: true }
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Message>>>>;

/// A connection to one agent. Calls may run concurrently from several tasks (`&self`).
pub struct RpcClient {
    sender: tokio::sync::Mutex<DealerSendHalf>,
    pending: Pending,
    next_seq: AtomicU64,
    reader: JoinHandle<()>,
}

impl Drop for RpcClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl RpcClient {
    /// Connects to `addr` (`host:port` or `tcp://host:port`) and completes callosum's
    /// handshake: `[PING, "", ""]` out, `PONG` back within five seconds.
    pub async fn connect(addr: &str) -> Result<RpcClient, RpcClientError> {
        let endpoint = if addr.contains("://") { addr.to_owned() } else { format!("tcp://{addr}") };
        let mut socket = DealerSocket::new();
        let handshake = async {
            socket
                .connect(&endpoint)
                .await
                .map_err(|source| RpcClientError::Connect { addr: endpoint.clone(), source: Box::new(source) })?;
            let ping = frames(vec![Bytes::from_static(PING), Bytes::new(), Bytes::new()]);
            socket
                .send(ping)
                .await
                .map_err(|source| RpcClientError::Send { method: "PING".into(), source: Box::new(source) })?;
            let answer = socket.recv().await.map_err(|_| RpcClientError::Closed)?;
            match answer.get(0) {
                Some(kind) if kind.as_ref() == PONG => Ok(()),
                other => Err(RpcClientError::BadHandshake {
                    addr: endpoint.clone(),
                    got: other.map(|f| String::from_utf8_lossy(f).into_owned()).unwrap_or_default(),
                }),
            }
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return Err(err),
            Err(_) => return Err(RpcClientError::Handshake { addr: endpoint }),
        }
        let (sender, receiver) = socket.split();
        let pending: Pending = Arc::default();
        let reader = tokio::spawn(read_replies(receiver, pending.clone()));
        Ok(RpcClient { sender: tokio::sync::Mutex::new(sender), pending, next_seq: AtomicU64::new(0), reader })
    }

    /// Calls `method(*args, **kwargs)` with the default options.
    pub async fn call(
        &self,
        method: &str,
        args: Vec<Value>,
        kwargs: Vec<(String, Value)>,
    ) -> Result<Value, RpcClientError> {
        self.call_with(method, args, kwargs, &CallOptions::default()).await
    }

    pub async fn call_with(
        &self,
        method: &str,
        args: Vec<Value>,
        kwargs: Vec<(String, Value)>,
        options: &CallOptions,
    ) -> Result<Value, RpcClientError> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed) % SEQ_MODULO;
        let mut request = Message::request(method, options.order_key.clone(), seq, args, kwargs);
        request.header.zip = options.zip;
        let (header, body) = request.encode()?;
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(seq, tx);
        let message = frames(vec![Bytes::from_static(UPPER), header.into(), body.into()]);
        if let Err(source) = self.sender.lock().await.send(message).await {
            lock(&self.pending).remove(&seq);
            return Err(RpcClientError::Send { method: method.to_owned(), source: Box::new(source) });
        }
        let reply = match tokio::time::timeout(options.timeout, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => return Err(RpcClientError::Closed),
            Err(_) => {
                lock(&self.pending).remove(&seq);
                // Tell the agent, as callosum does, so it stops working on it.
                let cancel = Message::reply(&request.header, MessageType::Cancel, Payload::Empty);
                if let Ok((header, body)) = cancel.encode() {
                    let message = frames(vec![Bytes::from_static(UPPER), header.into(), body.into()]);
                    let _ = self.sender.lock().await.send(message).await;
                }
                return Err(RpcClientError::Timeout { method: method.to_owned(), after: options.timeout });
            }
        };
        let method = method.to_owned();
        match (reply.header.kind, reply.payload) {
            (MessageType::Result, Payload::Value(value)) => Ok(value.unwrap_or(Value::Nil)),
            (MessageType::Failure, Payload::Error(error)) => Err(RpcClientError::Failure { method, error }),
            (MessageType::Error, Payload::Error(error)) => Err(RpcClientError::Internal { method, error }),
            (MessageType::Cancelled, _) => Err(RpcClientError::Cancelled { method }),
            (kind, _) => Err(RpcClientError::Internal {
                method,
                error: ErrorInfo::new("ValueError", &format!("unexpected reply type {kind:?}"), "bai-agent RPC client"),
            }),
        }
    }
}

fn lock(pending: &Pending) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Message>>> {
    pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn frames(parts: Vec<Bytes>) -> ZmqMessage {
    // Never empty: every caller passes three frames.
    ZmqMessage::try_from(parts).unwrap_or_else(|_| ZmqMessage::from(Bytes::new()))
}

/// Hands each reply to the call waiting on its seq; anything else is dropped.
async fn read_replies(mut receiver: DealerRecvHalf, pending: Pending) {
    loop {
        let message = match receiver.recv().await {
            Ok(message) => message,
            Err(err) => {
                tracing::debug!(%err, "RPC client receive error");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let parts = message.into_vec();
        let [kind, header, body] = parts.as_slice() else {
            tracing::debug!("RPC client: dropping a message of {} frames", parts.len());
            continue;
        };
        if kind.as_ref() != UPPER {
            continue;
        }
        match Message::decode(header, body) {
            Ok(reply) => {
                if let Some(waiter) = lock(&pending).remove(&reply.header.seq) {
                    let _ = waiter.send(reply);
                }
            }
            Err(err) => tracing::warn!("RPC client: cannot read a reply: {err}"),
        }
    }
}
