//! The REPL wire format: two-frame `[op, payload]` messages, op names and payload encodings
//! (JSON `{"exitCode": N}`, msgpack status, `waiting-input`), as Backend.AI's `BaseRunner` speaks them.

use bytes::Bytes;
use tokio::sync::mpsc;

/// Agent → runner op names.
pub mod op {
    pub const CODE: &str = "code";
    pub const CLEAN: &str = "clean";
    pub const BUILD: &str = "build";
    pub const EXEC: &str = "exec";
    pub const INPUT: &str = "input";
    pub const COMPLETE: &str = "complete";
    pub const INTERRUPT: &str = "interrupt";
    pub const STATUS: &str = "status";
    pub const EVENT: &str = "event";
    pub const START_SERVICE: &str = "start-service";
    pub const SHUTDOWN_SERVICE: &str = "shutdown-service";
    pub const GET_APPS: &str = "get-apps";
}

/// Runner → agent message types.
pub mod reply {
    pub const STDOUT: &str = "stdout";
    pub const STDERR: &str = "stderr";
    pub const FINISHED: &str = "finished";
    pub const BUILD_FINISHED: &str = "build-finished";
    pub const CLEAN_FINISHED: &str = "clean-finished";
    pub const WAITING_INPUT: &str = "waiting-input";
    pub const COMPLETION: &str = "completion";
    pub const STATUS: &str = "status";
    pub const SERVICE_RESULT: &str = "service-result";
    pub const APPS_RESULT: &str = "apps-result";
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("expected 2 frames [op, payload], got {0}")]
    FrameCount(usize),
    #[error("unknown op {0:?}")]
    UnknownOp(String),
}

/// One agent → runner request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Query mode: a snippet for the persistent interpreter.
    Code(String),
    /// Batch mode steps; an empty command is skipped (still answered).
    Clean(String),
    Build(String),
    Exec(String),
    /// A line answering `waiting-input`.
    Input(String),
    /// JSON `{"code": ..., ...opts}`.
    Complete(Bytes),
    Interrupt,
    Status,
    /// JSON `{"type", "data"}`, e.g. an OOM notice; logged only.
    Event(Bytes),
    /// JSON `{"name", "port", "protocol", "options", "ports"}`.
    StartService(Bytes),
    /// JSON string: the service name.
    ShutdownService(Bytes),
    /// Plain text: a service name, or empty for all.
    GetApps(String),
}

impl Request {
    /// Parses a received multipart message; Backend.AI's runner drops anything that is not two frames.
    pub fn parse(frames: &[Bytes]) -> Result<Request, ProtocolError> {
        let [op, payload] = frames else {
            return Err(ProtocolError::FrameCount(frames.len()));
        };
        let text = || String::from_utf8_lossy(payload).into_owned();
        Ok(match op.as_ref() {
            b"code" => Request::Code(text()),
            b"clean" => Request::Clean(text()),
            b"build" => Request::Build(text()),
            b"exec" => Request::Exec(text()),
            b"input" => Request::Input(text()),
            b"complete" => Request::Complete(payload.clone()),
            b"interrupt" => Request::Interrupt,
            b"status" => Request::Status,
            b"event" => Request::Event(payload.clone()),
            b"start-service" => Request::StartService(payload.clone()),
            b"shutdown-service" => Request::ShutdownService(payload.clone()),
            b"get-apps" => Request::GetApps(text()),
            other => return Err(ProtocolError::UnknownOp(String::from_utf8_lossy(other).into_owned())),
        })
    }
}

/// `{"exitCode": N}` of `finished`, `build-finished`, `clean-finished`.
pub fn exit_code_payload(code: i32) -> Bytes {
    Bytes::from(serde_json::json!({ "exitCode": code }).to_string())
}

/// `{"is_password": bool}` of `waiting-input`.
pub fn waiting_input_payload(is_password: bool) -> Bytes {
    Bytes::from(serde_json::json!({ "is_password": is_password }).to_string())
}

/// The `status` reply: msgpack `{"started_at": <float seconds, monotonic clock>}` (the agent
/// `msgpack.unpackb`s it).
pub fn status_payload(started_at: f64) -> Bytes {
    let mut out = Vec::with_capacity(22);
    out.push(0x81); // fixmap, 1 entry
    out.push(0xa0 | 10); // fixstr, 10 bytes
    out.extend_from_slice(b"started_at");
    out.push(0xcb); // float 64
    out.extend_from_slice(&started_at.to_be_bytes());
    Bytes::from(out)
}

/// Seconds on the monotonic clock, like Python's `time.monotonic()`.
pub fn monotonic_seconds() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Sends `[op, payload]` messages through the PUSH socket's task.
#[derive(Clone)]
pub struct Outbox(mpsc::Sender<(&'static str, Bytes)>);

impl Outbox {
    pub fn new(sender: mpsc::Sender<(&'static str, Bytes)>) -> Outbox {
        Outbox(sender)
    }

    pub async fn send(&self, op: &'static str, payload: Bytes) {
        if self.0.send((op, payload)).await.is_err() {
            tracing::debug!(op, "outbox closed; message dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_two_frames_only() {
        let code = Request::parse(&[Bytes::from_static(b"code"), Bytes::from_static(b"echo hi")]);
        assert_eq!(code.ok(), Some(Request::Code("echo hi".into())));
        assert!(matches!(Request::parse(&[Bytes::from_static(b"code")]), Err(ProtocolError::FrameCount(1))));
        assert!(matches!(
            Request::parse(&[Bytes::from_static(b"nope"), Bytes::new()]),
            Err(ProtocolError::UnknownOp(_))
        ));
    }

    #[test]
    fn status_is_msgpack_map() {
        let payload = status_payload(1.5);
        assert_eq!(&payload[..12], b"\x81\xaastarted_at");
        assert_eq!(payload[12], 0xcb);
        assert_eq!(f64::from_be_bytes(payload[13..21].try_into().unwrap_or_default()), 1.5);
        assert_eq!(exit_code_payload(3), Bytes::from_static(b"{\"exitCode\":3}"));
    }
}
