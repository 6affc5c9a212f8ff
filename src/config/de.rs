//! serde over an already-parsed document, keeping track of where it is, so that every error
//! names the exact field (`limits[2].window`) instead of a line and column of the JSON text.
//!
//! The configuration types derive `Deserialize`; this deserializer feeds them. Two things
//! differ from `serde_json::from_value`, on purpose:
//! * a field set to `null` reads as absent, as the operator's YAML tooling often writes it;
//! * the top object may be read in two passes by two types (the shape's own fields, then the
//!   options every shape shares): fields the other pass reads are skipped, and for the foreign
//!   shapes (ASM, Higress) fields neither reads become warnings instead of errors.

use std::cell::RefCell;
use std::fmt::Display;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Expected, IntoDeserializer, MapAccess, SeqAccess,
    Unexpected, Visitor,
};
use serde_json::{Map, Value};

use super::model::ConfigError;

/// Where a value sits in the configuration document, e.g. `limits[2].values[0].match`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Path(String);

impl Path {
    pub fn root() -> Self {
        Path(String::new())
    }

    pub fn field(&self, name: &str) -> Path {
        if self.0.is_empty() {
            Path(name.to_string())
        } else {
            Path(format!("{}.{}", self.0, name))
        }
    }

    pub fn index(&self, i: usize) -> Path {
        Path(format!("{}[{}]", self.0, i))
    }

    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            field: self.to_string(),
            message: message.into(),
        }
    }
}

/// A list that must be given and hold something, each item translated at its own path;
/// `missing` and `empty` say what to write instead.
pub fn each<T, U>(
    path: &Path,
    items: Option<Vec<T>>,
    missing: &str,
    empty: &str,
    mut translate: impl FnMut(T, &Path) -> Result<U, ConfigError>,
) -> Result<Vec<U>, ConfigError> {
    match items {
        None => Err(path.error(missing)),
        Some(items) if items.is_empty() => Err(path.error(empty)),
        Some(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| translate(item, &path.index(i)))
            .collect(),
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "(root)" } else { &self.0 })
    }
}

/// What the top object does with a field its type does not declare (nested objects of our own
/// shape always refuse them, through `deny_unknown_fields`).
#[derive(Clone, Copy)]
pub enum Unknown<'w> {
    /// Said nothing of: another pass reads them.
    Ignore,
    /// Named in a warning: the foreign shapes carry fields this plugin does not use.
    Warn(&'w RefCell<Vec<String>>),
}

/// Reads a JSON body (a rate-limit service's answer) as a `T`, unknown fields ignored; `None`
/// when it is not one. Through [`read`], not serde_json's typed deserializer: its errors
/// format floating-point numbers, which would link 18 KiB of float formatting into the .wasm.
pub fn read_json<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    let value: Value = serde_json::from_slice(bytes).ok()?;
    read::<T>(&value, &Path::root(), &[], Unknown::Ignore)
        .ok()
        .map(|(t, _)| t)
}

/// Reads `value` (found at `path`) as a `T`. The top object's fields named in `others` belong to
/// another pass and are skipped; its unknown fields are refused if `T` denies them, else handled
/// as `unknown` says. Returns the fields `T` declares, for the other pass.
pub fn read<T: DeserializeOwned>(
    value: &Value,
    path: &Path,
    others: &[&'static str],
    unknown: Unknown<'_>,
) -> Result<(T, &'static [&'static str]), ConfigError> {
    let declared = std::cell::Cell::new(&[][..]);
    let top = Top {
        others,
        unknown,
        declared: &declared,
    };
    let de = Reader {
        value,
        path: path.clone(),
        top: Some(&top),
        warn: None,
    };
    match T::deserialize(de) {
        Ok(t) => Ok((t, declared.get())),
        Err(e) => Err(e.into_config_error(path)),
    }
}

#[derive(Clone, Copy)]
struct Top<'a> {
    others: &'a [&'static str],
    unknown: Unknown<'a>,
    declared: &'a std::cell::Cell<&'static [&'static str]>,
}

/// One value and where it is.
struct Reader<'a> {
    value: &'a Value,
    path: Path,
    /// Set on the top object only.
    top: Option<&'a Top<'a>>,
    /// Set on the top object's fields when unknown ones are warned about.
    warn: Option<&'a RefCell<Vec<String>>>,
}

impl<'a> Reader<'a> {
    /// The error for a value of the wrong JSON type.
    fn mismatch(&self, expected: &dyn Expected) -> Error {
        let number;
        let unexpected = match self.value {
            Value::Null => Unexpected::Unit,
            Value::Bool(b) => Unexpected::Bool(*b),
            Value::Number(n) => {
                number = n.as_f64().unwrap_or_default();
                Unexpected::Float(number)
            }
            Value::String(s) => Unexpected::Str(s),
            Value::Array(_) => Unexpected::Seq,
            Value::Object(_) => Unexpected::Map,
        };
        <Error as de::Error>::invalid_type(unexpected, expected).at(&self.path)
    }

    fn child(&self, value: &'a Value, path: Path) -> Reader<'a> {
        let warn = match self.top {
            Some(Top {
                unknown: Unknown::Warn(w),
                ..
            }) => Some(*w),
            _ => None,
        };
        Reader {
            value,
            path,
            top: None,
            warn,
        }
    }
}

/// A deserialization error; the innermost reader that sees it sets where it happened. Boxed:
/// it travels through every `?` of every generated visitor, and a pointer is cheap to move.
#[derive(Debug)]
pub struct Error(Box<Fault>);

#[derive(Debug)]
struct Fault {
    path: Option<Path>,
    message: String,
    /// A required field was absent (the path is then the field's, not its object's).
    missing: Option<&'static str>,
    /// An undeclared field was given; the message lists what is expected.
    unknown: Option<Vec<&'static str>>,
}

impl Error {
    fn new(message: String) -> Error {
        Error(Box::new(Fault {
            path: None,
            message,
            missing: None,
            unknown: None,
        }))
    }

    #[inline(never)]
    fn at(mut self, path: &Path) -> Error {
        if self.0.path.is_none() {
            self.0.path = Some(match self.0.missing {
                Some(field) => path.field(field),
                None => path.clone(),
            });
        }
        self
    }

    fn into_config_error(self, top: &Path) -> ConfigError {
        let fault = *self.0;
        let path = fault.path.unwrap_or_else(|| top.clone());
        match fault.unknown {
            Some(names) => path.error(format!(
                "unknown field; expected one of: {}",
                names.join(", ")
            )),
            None => path.error(fault.message),
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.message)
    }
}

impl std::error::Error for Error {}

/// What the operator gave, in the words the error messages use.
fn found(unexpected: Unexpected<'_>) -> String {
    match unexpected {
        Unexpected::Bool(_) => "a boolean".into(),
        Unexpected::Unsigned(_) | Unexpected::Signed(_) | Unexpected::Float(_) => "a number".into(),
        Unexpected::Str(s) => format!("\"{s}\""),
        Unexpected::Unit | Unexpected::Option => "null".into(),
        Unexpected::Seq => "an array".into(),
        Unexpected::Map => "an object".into(),
        // Not found in JSON (characters, bytes, enum variants).
        _ => "a value of another kind".into(),
    }
}

/// What serde's visitors expect, in the same words.
fn expected(exp: &dyn Expected) -> String {
    let text = exp.to_string();
    if text.starts_with("struct ") || text == "a map" {
        "an object".into()
    } else if text == "a sequence" {
        "an array".into()
    } else if text == "a boolean" {
        "true or false".into()
    } else {
        text
    }
}

impl de::Error for Error {
    fn custom<T: Display>(msg: T) -> Self {
        Error::new(msg.to_string())
    }

    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        Error::custom(format!(
            "expected {}, found {}",
            expected(exp),
            found(unexp)
        ))
    }

    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        Error::custom(format!(
            "expected {}, found {}",
            expected(exp),
            found(unexp)
        ))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        let names: Vec<String> = expected.iter().map(|n| format!("\"{n}\"")).collect();
        Error::custom(format!("\"{variant}\" is not one of {}", names.join(", ")))
    }

    fn unknown_field(_field: &str, expected: &'static [&'static str]) -> Self {
        let mut e = Error::new("unknown field".into());
        e.0.unknown = Some(expected.to_vec());
        e
    }

    fn missing_field(field: &'static str) -> Self {
        let mut e = Error::new("is required".into());
        e.0.missing = Some(field);
        e
    }
}

impl<'de, 'a> de::Deserializer<'de> for Reader<'a> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let result = match self.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => visitor.visit_u64(u),
                (None, Some(i), _) => visitor.visit_i64(i),
                (None, None, Some(f)) => visitor.visit_f64(f),
                (None, None, None) => Err(de::Error::custom("is not a number")),
            },
            Value::String(s) => visitor.visit_str(s),
            Value::Array(items) => visitor.visit_seq(Items {
                items: items.iter(),
                index: 0,
                parent: &self,
            }),
            Value::Object(map) => visitor.visit_map(Fields {
                fields: map.iter(),
                pending: None,
                parent: &self,
            }),
        };
        result.map_err(|e: Error| e.at(&self.path))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        if let Some(top) = self.top {
            top.declared.set(fields);
        }
        // Only an object: serde would also build a struct from an array, by position.
        self.deserialize_map(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.value {
            Value::Object(map) => visitor
                .visit_map(Fields {
                    fields: map.iter(),
                    pending: None,
                    parent: &self,
                })
                .map_err(|e: Error| e.at(&self.path)),
            _ => Err(self.mismatch(&visitor)),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.value {
            Value::Array(items) => visitor
                .visit_seq(Items {
                    items: items.iter(),
                    index: 0,
                    parent: &self,
                })
                .map_err(|e: Error| e.at(&self.path)),
            _ => Err(self.mismatch(&visitor)),
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.value {
            Value::String(s) => visitor.visit_str(s).map_err(|e: Error| e.at(&self.path)),
            _ => Err(self.mismatch(&visitor)),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.value {
            Value::Bool(b) => visitor.visit_bool(*b).map_err(|e: Error| e.at(&self.path)),
            _ => Err(self.mismatch(&visitor)),
        }
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.value.as_f64() {
            Some(f) => visitor.visit_f64(f).map_err(|e: Error| e.at(&self.path)),
            None => Err(self.mismatch(&visitor)),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let result = match self.value {
            Value::String(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            other => Err(de::Error::custom(format!(
                "expected a string, found {}",
                kind(other)
            ))),
        };
        result.map_err(|e: Error| e.at(&self.path))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        if let Some(warnings) = self.warn {
            warnings.borrow_mut().push(format!(
                "`{}`: not used by llm-token-ratelimit; ignored",
                self.path
            ));
        }
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 char
        bytes byte_buf unit unit_struct tuple tuple_struct identifier
    }
}

/// The items of an array, each read at `path[i]`.
struct Items<'p, 'a> {
    items: std::slice::Iter<'a, Value>,
    index: usize,
    parent: &'p Reader<'a>,
}

impl<'de> SeqAccess<'de> for Items<'_, '_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        let Some(value) = self.items.next() else {
            return Ok(None);
        };
        let path = self.parent.path.index(self.index);
        self.index += 1;
        let reader = Reader {
            value,
            path,
            top: None,
            warn: None,
        };
        seed.deserialize(reader).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

/// The fields of an object, each read at `path.name`; `null` fields, and the top object's
/// fields another pass reads, are skipped.
struct Fields<'p, 'a> {
    fields: serde_json::map::Iter<'a>,
    pending: Option<(&'a String, &'a Value)>,
    parent: &'p Reader<'a>,
}

impl<'a> Fields<'_, 'a> {
    /// The next field to read, if any (kept out of the generic methods: one copy, not one per
    /// configuration type).
    #[inline(never)]
    fn advance(&mut self) -> Option<(&'a String, Path)> {
        let others = self.parent.top.map(|t| t.others).unwrap_or(&[]);
        let (name, value) = self
            .fields
            .by_ref()
            .find(|(name, value)| !value.is_null() && !others.contains(&name.as_str()))?;
        self.pending = Some((name, value));
        Some((name, self.parent.path.field(name)))
    }

    /// An error reading a field's name; a misspelt top-level field may be meant for another
    /// pass, so that pass's fields are listed too.
    #[inline(never)]
    fn key_error(&self, mut e: Error, path: &Path) -> Error {
        let others = self.parent.top.map(|t| t.others).unwrap_or(&[]);
        if let Some(names) = e.0.unknown.as_mut() {
            for name in others {
                if !names.contains(name) {
                    names.push(name);
                }
            }
        }
        e.at(path)
    }

    #[inline(never)]
    fn value_reader(&mut self) -> Result<Reader<'a>, Error> {
        match self.pending.take() {
            Some((name, value)) => Ok(self.parent.child(value, self.parent.path.field(name))),
            None => Err(de::Error::custom("a value without a field")),
        }
    }
}

impl<'de> MapAccess<'de> for Fields<'_, '_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some((name, path)) = self.advance() else {
            return Ok(None);
        };
        seed.deserialize(name.as_str().into_deserializer())
            .map(Some)
            .map_err(|e: Error| self.key_error(e, &path))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        // Every type raises its errors inside the reader's visit, which sets the path; a type
        // that checked its value after the reader returned would name the parent instead.
        seed.deserialize(self.value_reader()?)
    }
}

/// A JSON type, in the words the error messages use.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The raw object at the top, for recognising the shape and for fields read as plain JSON.
pub fn object<'a>(path: &Path, value: &'a Value) -> Result<&'a Map<String, Value>, ConfigError> {
    value
        .as_object()
        .ok_or_else(|| path.error(format!("expected an object, found {}", kind(value))))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The service's answers read as serde_json reads them (the reader the plugin used before):
    /// the same value, or a refusal by both; the three differences are below.
    #[test]
    fn answers_read_as_serde_json_reads_them() {
        fn same<T: DeserializeOwned + PartialEq + std::fmt::Debug>(body: &str) {
            assert_eq!(
                read_json::<T>(body.as_bytes()),
                serde_json::from_str::<T>(body).ok(),
                "{body}"
            );
        }
        // Where they differ: `null` is an absent field (its default), an object is never read
        // from an array by position, and a repeated field's last value counts.
        let read = |body: &str| read_json::<wire::CheckResponse>(body.as_bytes());
        assert_eq!(
            read(r#"{"allowed":true,"limits":null}"#),
            read(r#"{"allowed":true}"#)
        );
        assert_eq!(read("[true]"), None);
        assert_eq!(
            read(r#"{"allowed":true,"allowed":false}"#).map(|a| a.allowed),
            Some(false)
        );
        let checks = [
            r#"{"allowed":true}"#,
            r#"{"allowed":false,"limits":[],"retry_after_ms":1500,"denied_by":"user"}"#,
            r#"{"allowed":true,"limits":[{"limit":"u","value":"a","tokens":100,"window_s":60,"remaining":-5,"reset_ms":10}],"reserved_at_ms":5000}"#,
            r#"{"allowed":true,"limits":[{"limit":"u","value":"a","tokens":100,"window_s":60,"remaining":18446744073709551615,"currency":"USD","period":"month","resets_at":"2026-12-31T00:00:00Z"}]}"#,
            r#"{"allowed":true,"limits":[{"remaining":1.5}]}"#,
            r#"{"allowed":true,"limits":[{"period":"fortnight"}]}"#,
            r#"{"allowed":"yes"}"#,
            r#"{"allowed":true,"retry_after_ms":-1}"#,
            r#"{"allowed":true,"retry_after_ms":1e3}"#,
            r#"{"allowed":true,"denied_by":null,"reserved_at_ms":null,"extra":{"a":[1,2]}}"#,
            r#"{"limits":[]}"#,
            "not json",
            "",
        ];
        for body in checks {
            same::<wire::CheckResponse>(body);
        }
        for body in [
            r#"{"accepted":1,"duplicates":0,"results":[{"outcome":"applied"},{"outcome":"retry","error":"x"}]}"#,
            r#"{"accepted":0,"duplicates":0}"#,
            r#"{"accepted":0,"duplicates":0,"results":[{"outcome":"lost"}]}"#,
            r#"{"accepted":-1,"duplicates":0}"#,
        ] {
            same::<wire::ReportResponse>(body);
        }
        for body in [
            r#"{"allow":true}"#,
            r#"{"allow":false,"description":"over"}"#,
            r#"{"allow":1}"#,
        ] {
            same::<wire::AsmCheckResponse>(body);
        }
    }
}
