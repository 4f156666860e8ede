//! Slot names, their types, exact slot amounts and the `resource_slots` request parser.
//!
//! Backend.AI sends amounts as decimal strings (`"1"`, `"0.5"`, `"268435456"`), sometimes
//! as numbers, and byte sizes with a binary suffix (`"256m"`, `"1g"`). Amounts are kept as
//! exact decimals ([`rust_decimal::Decimal`]); nothing goes through a float.

use std::{collections::BTreeMap, fmt, str::FromStr};

use rust_decimal::{
    Decimal, RoundingStrategy,
    prelude::{FromPrimitive, ToPrimitive},
};

/// How a slot's amount is counted; Backend.AI's `SlotTypes` (`slot_key_and_units` in the heartbeat).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SlotType {
    /// A (possibly fractional) count: cores, devices, shares.
    Count,
    /// A whole number of bytes; strings may carry a binary suffix (`"1g"`).
    Bytes,
    /// One whole device or none.
    Unique,
}

impl SlotType {
    /// The unit word Backend.AI uses: `count`, `bytes` or `unique`.
    pub fn as_str(self) -> &'static str {
        match self {
            SlotType::Count => "count",
            SlotType::Bytes => "bytes",
            SlotType::Unique => "unique",
        }
    }

    /// Backend.AI's fallback for slots it has no type for: anything with `mem` in its name is bytes.
    pub fn guess(slot: &str) -> SlotType {
        if slot.contains("mem") { SlotType::Bytes } else { SlotType::Count }
    }
}

impl fmt::Display for SlotType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a slot name, an amount or a `resource_slots` map was refused. Every message starts
/// with the field it is about (`resource_slots.mem: "lots" is not an amount`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("{field}: {value} is not an amount")]
    NotAnAmount { field: String, value: String },
    #[error("{field}: {value} is negative")]
    Negative { field: String, value: String },
    #[error("{field}: {value} is not a whole number of bytes")]
    FractionalBytes { field: String, value: String },
    #[error("{field}: {value} is neither 0 nor 1 (a unique slot takes one whole device or none)")]
    NotUnique { field: String, value: String },
    #[error("{field}: unknown slot (this agent knows {known})")]
    UnknownSlot { field: String, known: String },
    #[error("{field}: missing (a kernel needs both `cpu` and `mem`)")]
    Missing { field: String },
    #[error("{field}: given twice")]
    Duplicate { field: String },
    #[error("{field}: expected a map of slot names to amounts, got {got}")]
    NotAMap { field: String, got: String },
    #[error("{field}: slot name {name} is not a string")]
    NameNotString { field: String, name: String },
    #[error("slot name {name:?} is not valid (lowercase letters, digits, `-` or `_`, at most one `.`)")]
    InvalidName { name: String },
}

/// Checks a slot name's spelling: `cpu`, `mem`, `cuda.device`, `hyperaccel-lpu.device`.
pub fn validate_slot_name(name: &str) -> Result<(), SlotError> {
    let part_ok = |part: &str| {
        let mut chars = part.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    };
    let valid = match name.split_once('.') {
        None => part_ok(name),
        Some((device, kind)) => part_ok(device) && part_ok(kind),
    };
    if valid { Ok(()) } else { Err(SlotError::InvalidName { name: name.to_string() }) }
}

/// The slots this agent knows and their types. `cpu` (count) and `mem` (bytes) are always
/// there; compute plugins register accelerator slots (`cuda.device`, `cuda.shares`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRegistry {
    slots: BTreeMap<String, SlotType>,
}

impl Default for SlotRegistry {
    fn default() -> Self {
        Self::intrinsic()
    }
}

impl SlotRegistry {
    /// Only the intrinsic slots: `cpu` (count) and `mem` (bytes).
    pub fn intrinsic() -> Self {
        let slots = BTreeMap::from([("cpu".to_string(), SlotType::Count), ("mem".to_string(), SlotType::Bytes)]);
        Self { slots }
    }

    /// Adds (or retypes) a slot; the name must be spelled like a slot name.
    pub fn register(&mut self, name: &str, slot_type: SlotType) -> Result<(), SlotError> {
        validate_slot_name(name)?;
        self.slots.insert(name.to_string(), slot_type);
        Ok(())
    }

    /// Builder form of [`register`](Self::register).
    pub fn with(mut self, name: &str, slot_type: SlotType) -> Result<Self, SlotError> {
        self.register(name, slot_type)?;
        Ok(self)
    }

    pub fn slot_type(&self, name: &str) -> Option<SlotType> {
        self.slots.get(name).copied()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.slots.contains_key(name)
    }

    /// `(name, type)` in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, SlotType)> {
        self.slots.iter().map(|(name, ty)| (name.as_str(), *ty))
    }

    /// The heartbeat's `slot_key_and_units`: slot name → `count | bytes | unique`.
    pub fn slot_key_and_units(&self) -> BTreeMap<String, &'static str> {
        self.slots.iter().map(|(name, ty)| (name.clone(), ty.as_str())).collect()
    }

    fn known_list(&self) -> String {
        self.slots.keys().map(|name| format!("`{name}`")).collect::<Vec<_>>().join(", ")
    }
}

/// An exact, non-negative slot amount.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotAmount(Decimal);

impl SlotAmount {
    pub const ZERO: SlotAmount = SlotAmount(Decimal::ZERO);

    /// Wraps a decimal; `None` when it is negative.
    pub fn from_decimal(value: Decimal) -> Option<SlotAmount> {
        if value.is_sign_negative() && !value.is_zero() { None } else { Some(SlotAmount(value.normalize())) }
    }

    pub fn from_u64(value: u64) -> SlotAmount {
        SlotAmount(Decimal::from(value))
    }

    pub fn as_decimal(&self) -> Decimal {
        self.0
    }

    pub fn is_zero(&self) -> bool {
        self.0.is_zero()
    }

    pub fn is_integer(&self) -> bool {
        self.0.fract().is_zero()
    }

    /// The amount as a whole number, if it is one and fits.
    pub fn to_u64(&self) -> Option<u64> {
        if self.is_integer() { self.0.to_u64() } else { None }
    }

    pub fn checked_add(self, other: SlotAmount) -> Option<SlotAmount> {
        self.0.checked_add(other.0).map(|sum| SlotAmount(sum.normalize()))
    }

    /// `self - other`, or `None` if that would be negative.
    pub fn checked_sub(self, other: SlotAmount) -> Option<SlotAmount> {
        if other.0 > self.0 { None } else { Some(SlotAmount((self.0 - other.0).normalize())) }
    }

    /// Parses text the way Backend.AI does for a slot of type `slot_type`: plain decimals
    /// (also `1E+2`), and for byte slots a binary suffix (`"256m"`, `"1.5g"`, `"1 GiB"`).
    /// `field` only labels errors.
    pub fn parse_str(text: &str, slot_type: SlotType, field: &str) -> Result<SlotAmount, SlotError> {
        let shown = format!("{text:?}");
        let value = match slot_type {
            SlotType::Bytes => parse_binary_size_decimal(text)
                .ok_or_else(|| SlotError::NotAnAmount { field: field.to_string(), value: shown.clone() })?,
            SlotType::Count | SlotType::Unique => parse_plain_decimal(text)
                .ok_or_else(|| SlotError::NotAnAmount { field: field.to_string(), value: shown.clone() })?,
        };
        Self::checked(value, slot_type, field, shown)
    }

    /// Parses a msgpack value: a string (as [`parse_str`](Self::parse_str)), an integer or a
    /// float. `Ok(None)` for nil, which Backend.AI treats as "not given".
    pub fn from_value(value: &rmpv::Value, slot_type: SlotType, field: &str) -> Result<Option<SlotAmount>, SlotError> {
        let not_an_amount = || SlotError::NotAnAmount { field: field.to_string(), value: describe_value(value) };
        let decimal = match value {
            rmpv::Value::Nil => return Ok(None),
            rmpv::Value::String(text) => {
                let text = text.as_str().ok_or_else(not_an_amount)?;
                return Self::parse_str(text, slot_type, field).map(Some);
            }
            rmpv::Value::Integer(int) => {
                if let Some(n) = int.as_u64() {
                    Decimal::from(n)
                } else if let Some(n) = int.as_i64() {
                    Decimal::from(n)
                } else {
                    return Err(not_an_amount());
                }
            }
            rmpv::Value::F64(float) => decimal_from_f64(*float).ok_or_else(not_an_amount)?,
            rmpv::Value::F32(float) => decimal_from_f64(f64::from(*float)).ok_or_else(not_an_amount)?,
            _ => return Err(not_an_amount()),
        };
        Self::checked(decimal, slot_type, field, describe_value(value)).map(Some)
    }

    /// Parses a JSON value (strings, numbers; `null` is "not given").
    pub fn from_json(
        value: &serde_json::Value,
        slot_type: SlotType,
        field: &str,
    ) -> Result<Option<SlotAmount>, SlotError> {
        let not_an_amount = || SlotError::NotAnAmount { field: field.to_string(), value: value.to_string() };
        match value {
            serde_json::Value::Null => Ok(None),
            serde_json::Value::String(text) => Self::parse_str(text, slot_type, field).map(Some),
            serde_json::Value::Number(number) => {
                let decimal = if let Some(n) = number.as_u64() {
                    Decimal::from(n)
                } else if let Some(n) = number.as_i64() {
                    Decimal::from(n)
                } else {
                    number.as_f64().and_then(decimal_from_f64).ok_or_else(not_an_amount)?
                };
                Self::checked(decimal, slot_type, field, value.to_string()).map(Some)
            }
            _ => Err(not_an_amount()),
        }
    }

    fn checked(value: Decimal, slot_type: SlotType, field: &str, shown: String) -> Result<SlotAmount, SlotError> {
        if value.is_sign_negative() && !value.is_zero() {
            return Err(SlotError::Negative { field: field.to_string(), value: shown });
        }
        let value = value.normalize();
        match slot_type {
            SlotType::Bytes if !value.fract().is_zero() => {
                Err(SlotError::FractionalBytes { field: field.to_string(), value: shown })
            }
            SlotType::Unique if value != Decimal::ZERO && value != Decimal::ONE => {
                Err(SlotError::NotUnique { field: field.to_string(), value: shown })
            }
            _ => Ok(SlotAmount(value)),
        }
    }
}

impl From<u64> for SlotAmount {
    fn from(value: u64) -> Self {
        SlotAmount::from_u64(value)
    }
}

impl From<u32> for SlotAmount {
    fn from(value: u32) -> Self {
        SlotAmount::from_u64(u64::from(value))
    }
}

/// Plain decimal text without exponent or trailing zeros: `1`, `0.5`, `268435456`.
impl fmt::Display for SlotAmount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.normalize())
    }
}

/// Parses a count (plain decimal); use [`SlotAmount::parse_str`] for byte slots.
impl FromStr for SlotAmount {
    type Err = SlotError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        SlotAmount::parse_str(text, SlotType::Count, "amount")
    }
}

/// Serialized as a decimal string, the way Backend.AI writes slot amounts.
impl serde::Serialize for SlotAmount {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SlotAmount {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        match SlotAmount::from_json(&value, SlotType::Count, "amount") {
            Ok(Some(amount)) => Ok(amount),
            Ok(None) => Err(serde::de::Error::custom("null is not an amount")),
            Err(err) => Err(serde::de::Error::custom(err)),
        }
    }
}

/// Slot name → amount, in name order.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct ResourceSlots(BTreeMap<String, SlotAmount>);

impl ResourceSlots {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses the `resource_slots` of a kernel creation config (a msgpack map) against the
    /// slots this agent knows. Nil amounts are dropped; an unknown slot is accepted only
    /// with a zero amount (and dropped), as Backend.AI does; `cpu` and `mem` must be there.
    pub fn parse_request(value: &rmpv::Value, registry: &SlotRegistry) -> Result<ResourceSlots, SlotError> {
        let slots = Self::parse_map(value, registry, "resource_slots")?;
        for required in ["cpu", "mem"] {
            if !slots.contains(required) {
                return Err(SlotError::Missing { field: format!("resource_slots.{required}") });
            }
        }
        Ok(slots)
    }

    /// Parses a msgpack map of slot amounts without requiring any slot; `field` names the
    /// map in errors (`resource_slots`, `available_slots`, …).
    pub fn parse_map(value: &rmpv::Value, registry: &SlotRegistry, field: &str) -> Result<ResourceSlots, SlotError> {
        let rmpv::Value::Map(entries) = value else {
            return Err(SlotError::NotAMap { field: field.to_string(), got: describe_value(value) });
        };
        let mut slots = BTreeMap::new();
        for (key, amount) in entries {
            let Some(name) = key.as_str() else {
                return Err(SlotError::NameNotString { field: field.to_string(), name: describe_value(key) });
            };
            let slot_field = format!("{field}.{name}");
            if slots.contains_key(name) {
                return Err(SlotError::Duplicate { field: slot_field });
            }
            let Some(slot_type) = registry.slot_type(name) else {
                // Unknown slots are fine with a zero amount and dropped; anything else is refused.
                match SlotAmount::from_value(amount, SlotType::guess(name), &slot_field)? {
                    None => continue,
                    Some(amount) if amount.is_zero() => continue,
                    Some(_) => return Err(SlotError::UnknownSlot { field: slot_field, known: registry.known_list() }),
                }
            };
            if let Some(amount) = SlotAmount::from_value(amount, slot_type, &slot_field)? {
                slots.insert(name.to_string(), amount);
            }
        }
        Ok(ResourceSlots(slots))
    }

    pub fn get(&self, slot: &str) -> Option<SlotAmount> {
        self.0.get(slot).copied()
    }

    /// The amount of `slot`, zero when absent.
    pub fn amount(&self, slot: &str) -> SlotAmount {
        self.get(slot).unwrap_or(SlotAmount::ZERO)
    }

    pub fn contains(&self, slot: &str) -> bool {
        self.0.contains_key(slot)
    }

    pub fn insert(&mut self, slot: impl Into<String>, amount: SlotAmount) -> Option<SlotAmount> {
        self.0.insert(slot.into(), amount)
    }

    pub fn remove(&mut self, slot: &str) -> Option<SlotAmount> {
        self.0.remove(slot)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, SlotAmount)> {
        self.0.iter().map(|(name, amount)| (name.as_str(), *amount))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Name → decimal string, Backend.AI's `ResourceSlot.to_json()` shape.
    pub fn to_string_map(&self) -> BTreeMap<String, String> {
        self.0.iter().map(|(name, amount)| (name.clone(), amount.to_string())).collect()
    }
}

impl FromIterator<(String, SlotAmount)> for ResourceSlots {
    fn from_iter<I: IntoIterator<Item = (String, SlotAmount)>>(iter: I) -> Self {
        ResourceSlots(iter.into_iter().collect())
    }
}

impl<'a> FromIterator<(&'a str, SlotAmount)> for ResourceSlots {
    fn from_iter<I: IntoIterator<Item = (&'a str, SlotAmount)>>(iter: I) -> Self {
        ResourceSlots(iter.into_iter().map(|(name, amount)| (name.to_string(), amount)).collect())
    }
}

/// A short description of a msgpack value for error messages: strings quoted, others as written.
fn describe_value(value: &rmpv::Value) -> String {
    match value {
        rmpv::Value::String(text) => match text.as_str() {
            Some(text) => format!("{text:?}"),
            None => "a non-UTF-8 string".to_string(),
        },
        rmpv::Value::Binary(_) => "binary data".to_string(),
        rmpv::Value::Array(_) => "an array".to_string(),
        rmpv::Value::Map(_) => "a map".to_string(),
        rmpv::Value::Ext(kind, _) => format!("a msgpack extension of type {kind}"),
        other => other.to_string(),
    }
}

/// A finite float as the decimal its shortest round-trip text spells (`0.1` → `0.1`).
fn decimal_from_f64(value: f64) -> Option<Decimal> {
    if !value.is_finite() {
        return None;
    }
    Decimal::from_str_exact(&value.to_string()).ok()
}

/// A plain or scientific decimal (`"1"`, `" 0.5 "`, `"1E+2"`, `"1_000"`).
fn parse_plain_decimal(text: &str) -> Option<Decimal> {
    let text = text.trim().replace('_', "");
    if text.is_empty() {
        return None;
    }
    if text.contains(['e', 'E']) { Decimal::from_scientific(&text).ok() } else { Decimal::from_str_exact(&text).ok() }
}

const BINARY_SUFFIXES: [(char, u32); 8] =
    [('k', 10), ('m', 20), ('g', 30), ('t', 40), ('p', 50), ('e', 60), ('z', 70), ('y', 80)];
const BINARY_ENDINGS: [&str; 6] = ["ibytes", "ibyte", "ib", "bytes", "byte", "b"];

/// Backend.AI's `BinarySize` parser, as a decimal number of bytes (fractions truncated
/// after scaling, as `int()` does): `"1073741824"`, `"1g"`, `"1.5G"`, `"256MiB"`, `"1 GiB"`.
fn parse_binary_size_decimal(text: &str) -> Option<Decimal> {
    let expr = text.trim().replace('_', "");
    if let Some(plain) = parse_plain_decimal(&expr) {
        // A plain number: whole bytes only; `checked` reports fractions.
        return Some(plain);
    }
    let expr = expr.to_ascii_lowercase();
    let stem = BINARY_ENDINGS.iter().find_map(|ending| expr.strip_suffix(ending)).unwrap_or(&expr);
    let suffix = stem.chars().last()?;
    let number = parse_plain_decimal(&stem[..stem.len() - suffix.len_utf8()])?;
    let multiplier = if suffix == ' ' {
        Decimal::ONE
    } else {
        let (_, shift) = BINARY_SUFFIXES.iter().find(|(c, _)| *c == suffix)?;
        Decimal::from_u128(1u128.checked_shl(*shift)?)?
    };
    Some(number.checked_mul(multiplier)?.trunc())
}

/// Deserializes a byte size written as bytes (`1073741824`) or a binary size (`"1g"`,
/// `"512m"`), for configuration fields (`#[serde(deserialize_with = …)]`).
pub fn deserialize_byte_size<'de, D: serde::Deserializer<'de>>(de: D) -> Result<u64, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }
    match <Raw as serde::Deserialize>::deserialize(de)? {
        Raw::Bytes(bytes) => Ok(bytes),
        Raw::Text(text) => parse_binary_size(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{text:?} is not a size; write e.g. \"1g\", \"512m\" or a number of bytes"
            ))
        }),
    }
}

/// Parses a byte size (`"1g"`, `"512m"`, `"1073741824"`) into whole bytes.
pub fn parse_binary_size(text: &str) -> Option<u64> {
    let value = parse_binary_size_decimal(text)?;
    if value.is_sign_negative() && !value.is_zero() || !value.fract().is_zero() {
        return None;
    }
    value.to_u64()
}

/// Backend.AI's `format(BinarySize(n), "s")`: scaled to the largest binary unit, at most two
/// decimals, lowercase suffix, no suffix below 1 KiB: `1073741824` → `"1g"`, `1536` → `"1.5k"`.
pub fn format_binary_size(bytes: u64) -> String {
    let mut scale = bytes;
    let mut index = 0usize;
    while scale >= 1024 && index < BINARY_SUFFIXES.len() {
        scale /= 1024;
        index += 1;
    }
    if index == 0 {
        return bytes.to_string();
    }
    let (suffix, shift) = BINARY_SUFFIXES[index - 1];
    format!("{}{suffix}", quantize_scaled(bytes, shift))
}

/// Backend.AI's `format(BinarySize(n), "m")` (and other fixed units): `0` → `"0m"`.
pub fn format_binary_size_in(bytes: u64, unit: char) -> String {
    match BINARY_SUFFIXES.iter().find(|(c, _)| *c == unit) {
        Some((suffix, shift)) => format!("{}{suffix}", quantize_scaled(bytes, *shift)),
        None => bytes.to_string(),
    }
}

fn quantize_scaled(bytes: u64, shift: u32) -> Decimal {
    let value = Decimal::from(bytes) / Decimal::from(1u128 << shift);
    if value.fract().is_zero() {
        value.trunc()
    } else {
        value.round_dp_with_strategy(2, RoundingStrategy::MidpointNearestEven).normalize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value;

    fn map(entries: &[(&str, Value)]) -> Value {
        Value::Map(entries.iter().map(|(k, v)| (Value::from(*k), v.clone())).collect())
    }

    fn cuda_registry() -> SlotRegistry {
        SlotRegistry::intrinsic()
            .with("cuda.device", SlotType::Count)
            .and_then(|r| r.with("cuda.shares", SlotType::Count))
            .expect("valid names")
    }

    #[test]
    fn amounts_parse_from_strings_ints_and_floats() {
        let amount = |v: Value, ty| SlotAmount::from_value(&v, ty, "f").expect("valid").expect("not nil").to_string();
        assert_eq!(amount(Value::from("1"), SlotType::Count), "1");
        assert_eq!(amount(Value::from("0.5"), SlotType::Count), "0.5");
        assert_eq!(amount(Value::from("2.000"), SlotType::Count), "2");
        assert_eq!(amount(Value::from("1E+2"), SlotType::Count), "100");
        assert_eq!(amount(Value::from(4), SlotType::Count), "4");
        assert_eq!(amount(Value::from(0.1), SlotType::Count), "0.1");
        assert_eq!(amount(Value::from("268435456"), SlotType::Bytes), "268435456");
        assert_eq!(amount(Value::from("256m"), SlotType::Bytes), "268435456");
        assert_eq!(amount(Value::from("1g"), SlotType::Bytes), "1073741824");
        assert_eq!(amount(Value::from("1.5G"), SlotType::Bytes), "1610612736");
        assert_eq!(amount(Value::from("1 GiB"), SlotType::Bytes), "1073741824");
        assert_eq!(amount(Value::from("512MiB"), SlotType::Bytes), "536870912");
        assert_eq!(amount(Value::from("536870912.000000"), SlotType::Bytes), "536870912");
        assert_eq!(amount(Value::from(1073741824.0), SlotType::Bytes), "1073741824");
        assert!(SlotAmount::from_value(&Value::Nil, SlotType::Count, "f").expect("nil is fine").is_none());
    }

    #[test]
    fn amounts_are_exact() {
        let a = SlotAmount::parse_str("0.1", SlotType::Count, "f").expect("valid");
        let b = SlotAmount::parse_str("0.2", SlotType::Count, "f").expect("valid");
        assert_eq!(a.checked_add(b), Some(SlotAmount::parse_str("0.3", SlotType::Count, "f").expect("valid")));
        assert_eq!(a.checked_sub(b), None);
        assert_eq!(SlotAmount::from_u64(u64::MAX).to_u64(), Some(u64::MAX));
        assert_eq!(SlotAmount::parse_str("1.5", SlotType::Count, "f").expect("valid").to_u64(), None);
    }

    #[test]
    fn bad_amounts_name_the_field_and_value() {
        let err = SlotAmount::parse_str("lots", SlotType::Bytes, "resource_slots.mem").expect_err("not a number");
        assert_eq!(err.to_string(), "resource_slots.mem: \"lots\" is not an amount");
        let err = SlotAmount::parse_str("-1", SlotType::Count, "resource_slots.cpu").expect_err("negative");
        assert_eq!(err.to_string(), "resource_slots.cpu: \"-1\" is negative");
        let err = SlotAmount::from_value(&Value::from(-2), SlotType::Count, "x").expect_err("negative");
        assert!(matches!(err, SlotError::Negative { .. }), "{err}");
        let err = SlotAmount::parse_str("1.5", SlotType::Bytes, "resource_slots.mem").expect_err("fraction");
        assert_eq!(err.to_string(), "resource_slots.mem: \"1.5\" is not a whole number of bytes");
        let err = SlotAmount::parse_str("2", SlotType::Unique, "resource_slots.x.device").expect_err("unique");
        assert!(matches!(err, SlotError::NotUnique { .. }), "{err}");
        for bad in [Value::F64(f64::NAN), Value::F64(f64::INFINITY), Value::Boolean(true), Value::from("")] {
            let err = SlotAmount::from_value(&bad, SlotType::Count, "f").expect_err("not an amount");
            assert!(matches!(err, SlotError::NotAnAmount { .. }), "{bad}: {err}");
        }
        for bad in ["1x", "g", "inf", "1.2.3g", "--1"] {
            assert!(SlotAmount::parse_str(bad, SlotType::Bytes, "f").is_err(), "{bad}");
        }
    }

    #[test]
    fn request_parses_known_slots() {
        let request = map(&[
            ("cpu", Value::from("2")),
            ("mem", Value::from("1g")),
            ("cuda.shares", Value::from("0.5")),
            ("cuda.device", Value::Nil),
        ]);
        let slots = ResourceSlots::parse_request(&request, &cuda_registry()).expect("valid");
        assert_eq!(slots.amount("cpu"), SlotAmount::from_u64(2));
        assert_eq!(slots.amount("mem"), SlotAmount::from_u64(1 << 30));
        assert_eq!(slots.amount("cuda.shares").to_string(), "0.5");
        assert!(!slots.contains("cuda.device"));
        let json = serde_json::to_string(&slots).expect("serializes");
        assert_eq!(json, r#"{"cpu":"2","cuda.shares":"0.5","mem":"1073741824"}"#);
        let back: ResourceSlots = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, slots);
    }

    #[test]
    fn request_errors_name_the_slot() {
        let registry = cuda_registry();
        let err =
            ResourceSlots::parse_request(&map(&[("cpu", Value::from(1)), ("mem", Value::from("lots"))]), &registry)
                .expect_err("bad mem");
        assert_eq!(err.to_string(), "resource_slots.mem: \"lots\" is not an amount");
        let err = ResourceSlots::parse_request(&map(&[("mem", Value::from("1g"))]), &registry).expect_err("no cpu");
        assert_eq!(err.to_string(), "resource_slots.cpu: missing (a kernel needs both `cpu` and `mem`)");
        let err = ResourceSlots::parse_request(
            &map(&[("cpu", Value::from(1)), ("mem", Value::from(1)), ("tpu.device", Value::from(1))]),
            &registry,
        )
        .expect_err("unknown slot");
        assert!(err.to_string().starts_with("resource_slots.tpu.device: unknown slot"), "{err}");
        assert!(err.to_string().contains("`cuda.device`"), "{err}");
        let err = ResourceSlots::parse_request(&Value::from("cpu=1"), &registry).expect_err("not a map");
        assert!(matches!(err, SlotError::NotAMap { .. }), "{err}");
        let err = ResourceSlots::parse_request(&Value::Map(vec![(Value::from(1), Value::from(1))]), &registry)
            .expect_err("non-string name");
        assert!(matches!(err, SlotError::NameNotString { .. }), "{err}");
        let err = ResourceSlots::parse_request(
            &map(&[("cpu", Value::from(1)), ("cpu", Value::from(2)), ("mem", Value::from(1))]),
            &registry,
        )
        .expect_err("twice");
        assert_eq!(err.to_string(), "resource_slots.cpu: given twice");
    }

    #[test]
    fn unknown_slots_with_zero_are_dropped() {
        let request = map(&[("cpu", Value::from(1)), ("mem", Value::from(1)), ("tpu.device", Value::from("0"))]);
        let slots = ResourceSlots::parse_request(&request, &SlotRegistry::intrinsic()).expect("zero is fine");
        assert!(!slots.contains("tpu.device"));
        assert_eq!(slots.len(), 2);
    }

    #[test]
    fn slot_names_are_checked_when_registered() {
        let mut registry = SlotRegistry::intrinsic();
        for good in ["cuda.device", "cuda.shares", "hyperaccel-lpu.device", "rocm.device", "x_1"] {
            registry.register(good, SlotType::Count).expect(good);
        }
        for bad in ["", "CPU", "cuda.", ".device", "a.b.c", "cuda device", "1gpu"] {
            assert!(matches!(registry.register(bad, SlotType::Count), Err(SlotError::InvalidName { .. })), "{bad:?}");
        }
        assert_eq!(registry.slot_key_and_units().get("mem"), Some(&"bytes"));
        assert_eq!(registry.slot_type("cuda.device"), Some(SlotType::Count));
    }

    #[test]
    fn binary_sizes_format_like_backend_ai() {
        assert_eq!(format_binary_size(0), "0");
        assert_eq!(format_binary_size(1000), "1000");
        assert_eq!(format_binary_size(1024), "1k");
        assert_eq!(format_binary_size(1536), "1.5k");
        assert_eq!(format_binary_size(1 << 30), "1g");
        assert_eq!(format_binary_size(268435456), "256m");
        assert_eq!(format_binary_size(1_000_000_000), "953.67m");
        assert_eq!(format_binary_size_in(0, 'm'), "0m");
        assert_eq!(format_binary_size_in(1 << 30, 'm'), "1024m");
        assert_eq!(parse_binary_size("1g"), Some(1 << 30));
        assert_eq!(parse_binary_size("0m"), Some(0));
        assert_eq!(parse_binary_size("1.5"), None);
        assert_eq!(parse_binary_size("-1g"), None);
        assert_eq!(parse_binary_size("64y"), None, "beyond u64");
    }
}
