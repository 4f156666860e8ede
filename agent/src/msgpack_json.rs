//! msgpack values as JSON and back, for the places where Backend.AI's wire carries JSON (the
//! kernel runner's options and results, the 26.9 event payloads): maps with string keys
//! (other keys stringified), bytes and invalid UTF-8 as lossy text, extension values as null.

use rmpv::Value;
use serde_json::Value as Json;

/// A msgpack map with string keys, in the order given (how replies and events are built).
pub fn map(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(entries.into_iter().map(|(k, v)| (Value::from(k), v)).collect())
}

/// A msgpack value as JSON.
pub fn to_json(value: &Value) -> Json {
    match value {
        Value::Nil => Json::Null,
        Value::Boolean(b) => Json::Bool(*b),
        Value::Integer(n) => n.as_i64().map(Json::from).or_else(|| n.as_u64().map(Json::from)).unwrap_or_default(),
        Value::F32(f) => f64::from(*f).into(),
        Value::F64(f) => (*f).into(),
        Value::String(s) => String::from_utf8_lossy(s.as_bytes()).into_owned().into(),
        Value::Binary(bytes) => String::from_utf8_lossy(bytes).into_owned().into(),
        Value::Array(items) => items.iter().map(to_json).collect(),
        Value::Map(entries) => entries
            .iter()
            .map(|(k, v)| (k.as_str().map(str::to_owned).unwrap_or_else(|| k.to_string()), to_json(v)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
        Value::Ext(..) => Json::Null,
    }
}

/// A JSON value as msgpack (integers stay integers, other numbers become floats).
pub fn from_json(value: &Json) -> Value {
    match value {
        Json::Null => Value::Nil,
        Json::Bool(b) => (*b).into(),
        Json::Number(n) => n
            .as_i64()
            .map(Value::from)
            .or_else(|| n.as_u64().map(Value::from))
            .unwrap_or_else(|| Value::F64(n.as_f64().unwrap_or_default())),
        Json::String(s) => s.as_str().into(),
        Json::Array(items) => Value::Array(items.iter().map(from_json).collect()),
        Json::Object(entries) => Value::Map(entries.iter().map(|(k, v)| (k.as_str().into(), from_json(v))).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_odd_keys_are_stringified() {
        // JSON objects come back with their keys in order.
        let value = Value::Map(vec![
            (Value::from("big"), Value::from(u64::MAX)),
            (Value::from("f"), Value::F64(1.5)),
            (Value::from("list"), Value::Array(vec![Value::Nil, Value::from(true), Value::from("x")])),
            (Value::from("n"), Value::from(-3)),
        ]);
        assert_eq!(from_json(&to_json(&value)), value);
        let odd = Value::Map(vec![
            (Value::from(7), Value::Binary(b"hi".to_vec())),
            (Value::from("e"), Value::Ext(9, vec![])),
        ]);
        assert_eq!(to_json(&odd), serde_json::json!({"7": "hi", "e": null}));
    }
}
