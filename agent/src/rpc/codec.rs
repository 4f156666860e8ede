//! The callosum wire format: the msgpack header, the `{meta, body}` envelope with optional
//! raw-block snappy, request payloads (`{args, kwargs}`) and the failure metadata.
//!
//! What callosum 1.0.3 (`rpc/message.py`, `serialize.py`) puts on the wire, and so what we
//! read and write:
//!
//! - header: msgpack map `{"type": int, "meth": str, "okey": any, "seq": int, "zip": bool}`;
//! - body: msgpack map `{"meta": bin, "body": bin | nil}`, the whole map compressed with
//!   snappy's *raw block* format (`snappy.compress`, not the framing format) when `zip`;
//! - `meta` is itself msgpack, packed into a bin: `[]` for RESULT, CANCEL, CANCELLED and
//!   NULL, `[name, repr, traceback]` for FAILURE and ERROR, and an empty bin for FUNCTION;
//! - `body` is the serialized payload (msgpack, as Backend.AI's serializer makes it) for
//!   FUNCTION and RESULT, nil otherwise.
//!
//! msgpack follows Backend.AI's options: strings are `str`, bytes are `bin`
//! (`use_bin_type=True`), map keys of results are strings (Python's `strict_map_key`).

use std::io::Cursor;

use rmpv::Value;

/// Nesting deeper than this in any msgpack document is refused (rmpv counts about two
/// levels per container), so a hostile request cannot exhaust the stack.
pub const MAX_DEPTH: usize = 256;

/// The largest payload we decompress. Snappy announces the decompressed length up front, so
/// a body claiming more is refused before anything is allocated.
pub const MAX_BODY_BYTES: usize = 256 * 1024 * 1024;

/// Why bytes from the wire could not be read as a callosum message (none of these stop the
/// server: each becomes a FAILURE reply or a warning), or why the socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("cannot bind the RPC socket on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: Box<zeromq::ZmqError> },
    #[error("the {part} is not valid msgpack: {reason}")]
    Msgpack { part: &'static str, reason: String },
    #[error("the {part} has {extra} trailing bytes after its msgpack value")]
    Trailing { part: &'static str, extra: usize },
    #[error("the {part} is not a msgpack map")]
    NotAMap { part: &'static str },
    #[error("the {part} has no `{field}` field")]
    MissingField { part: &'static str, field: &'static str },
    #[error("the {part} field `{field}` must be {expected}, got {got}")]
    FieldType { part: &'static str, field: &'static str, expected: &'static str, got: &'static str },
    #[error("unknown message type {0} (callosum knows 0 to 6)")]
    UnknownType(i64),
    #[error("the body is not valid snappy (raw block format): {0}")]
    Snappy(String),
    #[error("the body would decompress to {0} bytes, more than the {MAX_BODY_BYTES} allowed")]
    TooLarge(usize),
    #[error("cannot encode msgpack: {0}")]
    Encode(String),
}

/// `RPCMessageTypes` of callosum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    Null = 0,
    /// A request to run a function.
    Function = 1,
    /// The function's return value.
    Result = 2,
    /// The function raised (a user-level error).
    Failure = 3,
    /// The RPC machinery itself failed.
    Error = 4,
    /// The client gave up on a request (timeout or cancel).
    Cancel = 5,
    /// The server cancelled a request.
    Cancelled = 6,
}

impl MessageType {
    pub fn from_code(code: i64) -> Result<MessageType, RpcError> {
        Ok(match code {
            0 => MessageType::Null,
            1 => MessageType::Function,
            2 => MessageType::Result,
            3 => MessageType::Failure,
            4 => MessageType::Error,
            5 => MessageType::Cancel,
            6 => MessageType::Cancelled,
            other => return Err(RpcError::UnknownType(other)),
        })
    }

    pub fn code(self) -> i64 {
        self as i64
    }
}

/// The decoded header frame. `method`, `order_key` and `seq` together name a request; a
/// reply must carry them back unchanged (callosum's client matches replies on all three).
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub kind: MessageType,
    pub method: String,
    /// The ordering key exactly as sent (callosum's default is `b""`; Backend.AI's manager
    /// sends `""`), so it is kept as a value and echoed byte for byte.
    pub order_key: Value,
    pub seq: u64,
    pub zip: bool,
}

/// What callosum's `ErrorMetadata` carries for FAILURE and ERROR replies. A Python client
/// raises `RPCUserError(name, repr, traceback)` (or `RPCInternalError`) from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorInfo {
    /// The exception's class name, e.g. `TypeError`.
    pub name: String,
    /// `repr()` of the exception, e.g. `TypeError('ping: …')`.
    pub repr: String,
    /// A formatted traceback; its last line is `Name: message` like Python's.
    pub traceback: String,
}

impl ErrorInfo {
    /// An error in Python's shapes: `repr` is `Name('message')`, the traceback ends with
    /// `Name: message`. A Rust agent has no Python frames to show, so the traceback says who
    /// raised it instead.
    pub fn new(name: &str, message: &str, origin: &str) -> ErrorInfo {
        ErrorInfo {
            name: name.to_owned(),
            repr: format!("{name}({})", python_str_repr(message)),
            traceback: format!("Traceback (most recent call last):\n  {origin}\n{name}: {message}\n"),
        }
    }

    /// The human message: the last traceback line without its `Name: ` prefix, else the repr.
    pub fn message(&self) -> String {
        let last = self.traceback.lines().rev().find(|line| !line.trim().is_empty()).unwrap_or_default();
        match last.strip_prefix(&format!("{}: ", self.name)) {
            Some(message) => message.to_owned(),
            None if !self.repr.is_empty() => self.repr.clone(),
            None => last.to_owned(),
        }
    }
}

/// `repr()` of a Python `str`: single quotes unless the text has some and no double ones.
fn python_str_repr(text: &str) -> String {
    let quote = if text.contains('\'') && !text.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(text.len() + 2);
    out.push(quote);
    for ch in text.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// The part of a message after the header: what the `meta` and `body` fields hold.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// FUNCTION and RESULT: the deserialized body (a request's `{args, kwargs}`, a return
    /// value). `None` when the body field was nil.
    Value(Option<Value>),
    /// FAILURE and ERROR.
    Error(ErrorInfo),
    /// NULL, CANCEL, CANCELLED.
    Empty,
}

/// One callosum RPC message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub header: Header,
    pub payload: Payload,
}

impl Message {
    /// A FUNCTION request with `{"args": args, "kwargs": kwargs}`.
    pub fn request(
        method: &str,
        order_key: Value,
        seq: u64,
        args: Vec<Value>,
        kwargs: Vec<(String, Value)>,
    ) -> Message {
        let kwargs = kwargs.into_iter().map(|(k, v)| (Value::from(k), v)).collect();
        let body =
            Value::Map(vec![(Value::from("args"), Value::Array(args)), (Value::from("kwargs"), Value::Map(kwargs))]);
        Message {
            header: Header { kind: MessageType::Function, method: method.to_owned(), order_key, seq, zip: true },
            payload: Payload::Value(Some(body)),
        }
    }

    /// A reply to the request named by `request` (method, order key and seq echoed).
    pub fn reply(request: &Header, kind: MessageType, payload: Payload) -> Message {
        Message {
            header: Header {
                kind,
                method: request.method.clone(),
                order_key: request.order_key.clone(),
                seq: request.seq,
                zip: request.zip,
            },
            payload,
        }
    }

    pub fn result(request: &Header, value: Value) -> Message {
        Self::reply(request, MessageType::Result, Payload::Value(Some(value)))
    }

    pub fn failure(request: &Header, error: ErrorInfo) -> Message {
        Self::reply(request, MessageType::Failure, Payload::Error(error))
    }

    pub fn cancelled(request: &Header) -> Message {
        Self::reply(request, MessageType::Cancelled, Payload::Empty)
    }

    /// The header and body frames, compressing the body when `header.zip` is set.
    pub fn encode(&self) -> Result<(Vec<u8>, Vec<u8>), RpcError> {
        let header = encode_header(&self.header)?;
        let (meta, body) = match &self.payload {
            Payload::Value(value) => {
                let meta = match self.header.kind {
                    // callosum sends no metadata with a request: an empty bin.
                    MessageType::Function => Vec::new(),
                    _ => pack(&Value::Array(Vec::new()))?,
                };
                let body = match value {
                    Some(value) => Value::Binary(pack(value)?),
                    None => Value::Nil,
                };
                (meta, body)
            }
            Payload::Error(error) => {
                let fields = vec![
                    Value::from(error.name.as_str()),
                    Value::from(error.repr.as_str()),
                    Value::from(error.traceback.as_str()),
                ];
                (pack(&Value::Array(fields))?, Value::Nil)
            }
            Payload::Empty => (pack(&Value::Array(Vec::new()))?, Value::Nil),
        };
        let envelope = Value::Map(vec![(Value::from("meta"), Value::Binary(meta)), (Value::from("body"), body)]);
        let mut data = pack(&envelope)?;
        if self.header.zip {
            data = snap::raw::Encoder::new().compress_vec(&data).map_err(|err| RpcError::Snappy(err.to_string()))?;
        }
        Ok((header, data))
    }

    /// Decodes both frames.
    pub fn decode(header: &[u8], body: &[u8]) -> Result<Message, RpcError> {
        let header = decode_header(header)?;
        let payload = decode_body(&header, body)?;
        Ok(Message { header, payload })
    }
}

/// msgpack bytes of `value` (str as str, bytes as bin).
pub fn pack(value: &Value) -> Result<Vec<u8>, RpcError> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, value).map_err(|err| RpcError::Encode(err.to_string()))?;
    Ok(out)
}

/// Exactly one msgpack value filling `bytes`.
pub fn unpack(bytes: &[u8], part: &'static str) -> Result<Value, RpcError> {
    let mut cursor = Cursor::new(bytes);
    let value = rmpv::decode::read_value_with_max_depth(&mut cursor, MAX_DEPTH)
        .map_err(|err| RpcError::Msgpack { part, reason: err.to_string() })?;
    let used = usize::try_from(cursor.position()).unwrap_or(bytes.len());
    if used < bytes.len() {
        return Err(RpcError::Trailing { part, extra: bytes.len() - used });
    }
    Ok(value)
}

/// The name of a value's msgpack type, for error messages ("got integer").
pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Nil => "nil",
        Value::Boolean(_) => "boolean",
        Value::Integer(_) => "integer",
        Value::F32(_) | Value::F64(_) => "float",
        Value::String(s) if s.is_str() => "string",
        Value::String(_) => "string (invalid UTF-8)",
        Value::Binary(_) => "bytes",
        Value::Array(_) => "array",
        Value::Map(_) => "map",
        Value::Ext(..) => "extension",
    }
}

/// The value under the string key `key` of a msgpack map.
pub fn map_get<'a>(entries: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    entries.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
}

pub fn encode_header(header: &Header) -> Result<Vec<u8>, RpcError> {
    pack(&Value::Map(vec![
        (Value::from("type"), Value::from(header.kind.code())),
        (Value::from("meth"), Value::from(header.method.as_str())),
        (Value::from("okey"), header.order_key.clone()),
        (Value::from("seq"), Value::from(header.seq)),
        (Value::from("zip"), Value::from(header.zip)),
    ]))
}

const HEADER: &str = "header";

/// Reads the header frame. Every field is required, as callosum requires them.
pub fn decode_header(bytes: &[u8]) -> Result<Header, RpcError> {
    let value = unpack(bytes, HEADER)?;
    let Value::Map(entries) = &value else {
        return Err(RpcError::NotAMap { part: HEADER });
    };
    let field = |name: &'static str| map_get(entries, name).ok_or(RpcError::MissingField { part: HEADER, field: name });
    let wrong = |name: &'static str, expected: &'static str, got: &Value| RpcError::FieldType {
        part: HEADER,
        field: name,
        expected,
        got: type_name(got),
    };
    let kind = field("type")?;
    let kind = MessageType::from_code(kind.as_i64().ok_or_else(|| wrong("type", "an integer", kind))?)?;
    let method = field("meth")?;
    let method = method.as_str().ok_or_else(|| wrong("meth", "a string", method))?.to_owned();
    let order_key = field("okey")?.clone();
    let seq = field("seq")?;
    let seq = seq.as_u64().ok_or_else(|| wrong("seq", "a non-negative integer", seq))?;
    let zip = field("zip")?;
    let zip = zip.as_bool().ok_or_else(|| wrong("zip", "a boolean", zip))?;
    Ok(Header { kind, method, order_key, seq, zip })
}

const BODY: &str = "body";

/// Reads the body frame of a message whose header is `header`.
pub fn decode_body(header: &Header, bytes: &[u8]) -> Result<Payload, RpcError> {
    let decompressed;
    let data = if header.zip {
        let size = snap::raw::decompress_len(bytes).map_err(|err| RpcError::Snappy(err.to_string()))?;
        if size > MAX_BODY_BYTES {
            return Err(RpcError::TooLarge(size));
        }
        decompressed =
            snap::raw::Decoder::new().decompress_vec(bytes).map_err(|err| RpcError::Snappy(err.to_string()))?;
        &decompressed[..]
    } else {
        bytes
    };
    let value = unpack(data, BODY)?;
    let Value::Map(entries) = &value else {
        return Err(RpcError::NotAMap { part: BODY });
    };
    let meta = map_get(entries, "meta").ok_or(RpcError::MissingField { part: BODY, field: "meta" })?;
    let body = map_get(entries, "body").ok_or(RpcError::MissingField { part: BODY, field: "body" })?;
    match header.kind {
        MessageType::Function | MessageType::Result => match body {
            Value::Nil => Ok(Payload::Value(None)),
            Value::Binary(serialized) => Ok(Payload::Value(Some(unpack(serialized, "payload")?))),
            other => {
                Err(RpcError::FieldType { part: BODY, field: "body", expected: "bytes or nil", got: type_name(other) })
            }
        },
        MessageType::Failure | MessageType::Error => Ok(Payload::Error(decode_error_meta(meta)?)),
        MessageType::Null | MessageType::Cancel | MessageType::Cancelled => Ok(Payload::Empty),
    }
}

/// `ErrorMetadata`: a bin holding msgpack `[name, repr, traceback]`.
fn decode_error_meta(meta: &Value) -> Result<ErrorInfo, RpcError> {
    let Value::Binary(packed) = meta else {
        return Err(RpcError::FieldType { part: BODY, field: "meta", expected: "bytes", got: type_name(meta) });
    };
    let fields = match unpack(packed, "error metadata")? {
        Value::Array(fields) => fields,
        other => {
            return Err(RpcError::FieldType {
                part: "error metadata",
                field: "meta",
                expected: "an array [name, repr, traceback]",
                got: type_name(&other),
            });
        }
    };
    let text = |index: usize| match fields.get(index) {
        Some(Value::String(s)) => s.as_str().map(str::to_owned).unwrap_or_default(),
        Some(Value::Nil) | None => String::new(),
        Some(other) => other.to_string(),
    };
    Ok(ErrorInfo { name: text(0), repr: text(1), traceback: text(2) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: MessageType, zip: bool) -> Header {
        Header { kind, method: "ping".into(), order_key: Value::from(""), seq: 7, zip }
    }

    #[test]
    fn header_round_trips_and_uses_callosums_field_names() {
        for kind in [MessageType::Function, MessageType::Result, MessageType::Failure, MessageType::Cancelled] {
            for order_key in [Value::from(""), Value::Binary(Vec::new()), Value::from("k1"), Value::Nil] {
                let h = Header { order_key, ..header(kind, true) };
                let bytes = encode_header(&h).expect("encode");
                assert_eq!(decode_header(&bytes).expect("decode"), h);
            }
        }
        let bytes = encode_header(&header(MessageType::Function, false)).expect("encode");
        let Value::Map(entries) = unpack(&bytes, "header").expect("msgpack") else { panic!("not a map") };
        let keys: Vec<&str> = entries.iter().filter_map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["type", "meth", "okey", "seq", "zip"]);
    }

    #[test]
    fn request_round_trips_with_and_without_snappy() {
        for zip in [true, false] {
            let mut message = Message::request(
                "ping",
                Value::from("okey"),
                3,
                vec![Value::from("hello"), Value::Binary(vec![0, 1, 2])],
                vec![("flag".into(), Value::from(true))],
            );
            message.header.zip = zip;
            let (h, b) = message.encode().expect("encode");
            assert_eq!(Message::decode(&h, &b).expect("decode"), message);
        }
    }

    #[test]
    fn zip_means_raw_block_snappy_of_the_envelope() {
        let message = Message::result(&header(MessageType::Function, true), Value::from("pong"));
        let (_, body) = message.encode().expect("encode");
        // The raw block format starts with the varint length; the framing format would
        // start with the stream identifier chunk 0xff 06 00 00 "sNaPpY".
        assert_ne!(body.first(), Some(&0xff));
        let plain = snap::raw::Decoder::new().decompress_vec(&body).expect("raw snappy");
        let Value::Map(entries) = unpack(&plain, "body").expect("msgpack") else { panic!("not a map") };
        assert_eq!(map_get(&entries, "meta"), Some(&Value::Binary(vec![0x90])), "ResultMetadata packs as []");
        assert_eq!(map_get(&entries, "body"), Some(&Value::Binary(pack(&Value::from("pong")).expect("pack"))));
    }

    #[test]
    fn uncompressed_body_is_plain_msgpack() {
        let message = Message::result(&header(MessageType::Function, false), Value::from(1));
        let (_, body) = message.encode().expect("encode");
        assert!(unpack(&body, "body").is_ok());
    }

    #[test]
    fn failure_carries_name_repr_and_traceback_packed_in_meta() {
        let info = ErrorInfo::new("TypeError", "ping: argument `msg` must be a string, got integer", "in bai-agent");
        assert_eq!(info.repr, "TypeError('ping: argument `msg` must be a string, got integer')");
        assert!(info.traceback.ends_with("TypeError: ping: argument `msg` must be a string, got integer\n"));
        assert_eq!(info.message(), "ping: argument `msg` must be a string, got integer");
        for zip in [true, false] {
            let message = Message::failure(&header(MessageType::Function, zip), info.clone());
            let (h, b) = message.encode().expect("encode");
            let decoded = Message::decode(&h, &b).expect("decode");
            assert_eq!(decoded.header.kind, MessageType::Failure);
            assert_eq!(decoded.payload, Payload::Error(info.clone()));

            // The exact shape callosum's ErrorMetadata.decode expects: meta is a bin of a
            // 3-array of strings, body is nil.
            let plain = if zip { snap::raw::Decoder::new().decompress_vec(&b).expect("snappy") } else { b };
            let Value::Map(entries) = unpack(&plain, "body").expect("msgpack") else { panic!("not a map") };
            assert_eq!(map_get(&entries, "body"), Some(&Value::Nil));
            let Some(Value::Binary(meta)) = map_get(&entries, "meta") else { panic!("meta not bin") };
            assert_eq!(
                unpack(meta, "meta").expect("meta msgpack"),
                Value::Array(vec![
                    Value::from(info.name.as_str()),
                    Value::from(info.repr.as_str()),
                    Value::from(info.traceback.as_str())
                ])
            );
        }
    }

    #[test]
    fn python_repr_quotes_like_python() {
        assert_eq!(python_str_repr("plain"), "'plain'");
        assert_eq!(python_str_repr("it's"), "\"it's\"");
        assert_eq!(python_str_repr("both ' and \""), "'both \\' and \"'");
        assert_eq!(python_str_repr("a\nb\\"), "'a\\nb\\\\'");
    }

    #[test]
    fn cancelled_round_trips() {
        let message = Message::cancelled(&header(MessageType::Function, true));
        let (h, b) = message.encode().expect("encode");
        assert_eq!(Message::decode(&h, &b).expect("decode"), message);
    }

    #[test]
    fn bad_headers_are_named() {
        let garbage = decode_header(&[0x85, 0xa4]).expect_err("a truncated map");
        assert!(matches!(garbage, RpcError::Msgpack { part: "header", .. }), "{garbage}");
        let not_map = decode_header(&pack(&Value::from(1)).expect("pack")).expect_err("not a map");
        assert!(matches!(not_map, RpcError::NotAMap { .. }));
        let missing = decode_header(
            &pack(&Value::Map(vec![(Value::from("type"), Value::from(1)), (Value::from("meth"), Value::from("x"))]))
                .expect("pack"),
        )
        .expect_err("no okey");
        assert!(missing.to_string().contains("`okey`"), "{missing}");
        let mut bytes = encode_header(&header(MessageType::Function, true)).expect("encode");
        bytes.push(0);
        assert!(matches!(decode_header(&bytes), Err(RpcError::Trailing { extra: 1, .. })));
        let wrong_type = Header { kind: MessageType::Function, ..header(MessageType::Function, true) };
        let mut raw = encode_header(&wrong_type).expect("encode");
        // type 9 does not exist
        let position = raw.iter().position(|&b| b == 0x01).expect("type byte");
        raw[position] = 0x09;
        assert!(matches!(decode_header(&raw), Err(RpcError::UnknownType(9))));
    }

    #[test]
    fn bad_bodies_are_named() {
        let h = header(MessageType::Function, true);
        let err = decode_body(&h, b"not snappy at all").expect_err("garbage");
        assert!(matches!(err, RpcError::Snappy(_) | RpcError::Msgpack { .. }), "{err}");
        let plain = header(MessageType::Function, false);
        let err = decode_body(&plain, &pack(&Value::Map(vec![])).expect("pack")).expect_err("no meta");
        assert!(err.to_string().contains("`meta`"), "{err}");
        let envelope =
            Value::Map(vec![(Value::from("meta"), Value::Binary(vec![])), (Value::from("body"), Value::from(5))]);
        let err = decode_body(&plain, &pack(&envelope).expect("pack")).expect_err("body not bytes");
        assert!(err.to_string().contains("bytes or nil, got integer"), "{err}");
        // A snappy block that claims a huge decompressed size is refused before allocating.
        let mut huge = Vec::new();
        let mut n = (MAX_BODY_BYTES + 1) as u64;
        while n >= 0x80 {
            huge.push((n as u8) | 0x80);
            n >>= 7;
        }
        huge.push(n as u8);
        assert!(matches!(decode_body(&h, &huge), Err(RpcError::TooLarge(_))));
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let mut bytes = vec![0x91; 100_000];
        bytes.push(0xc0);
        assert!(matches!(unpack(&bytes, "payload"), Err(RpcError::Msgpack { .. })));
    }
}
