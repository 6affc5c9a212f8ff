//! A small reader over `serde_json::Value` that remembers where it is, so every configuration
//! error names the exact field (`limits[2].window`) instead of serde's column numbers.

use serde_json::{Map, Value};

use super::ConfigError;

/// Where a value sits in the configuration document, e.g. `limits[2].values[0].match`.
#[derive(Clone, Debug)]
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
            field: if self.0.is_empty() {
                "(root)".into()
            } else {
                self.0.clone()
            },
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "(root)" } else { &self.0 })
    }
}

/// One JSON object being read; `finish` rejects the fields nobody asked for (typos).
pub struct Object<'a> {
    pub path: Path,
    map: &'a Map<String, Value>,
    known: Vec<&'static str>,
}

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

impl<'a> Object<'a> {
    pub fn new(path: Path, value: &'a Value) -> Result<Self, ConfigError> {
        match value {
            Value::Object(map) => Ok(Object {
                path,
                map,
                known: Vec::new(),
            }),
            other => Err(path.error(format!("expected an object, found {}", kind(other)))),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.map.get(name).is_some_and(|v| !v.is_null())
    }

    /// The raw value of `name`, if present and not null.
    pub fn value(&mut self, name: &'static str) -> Option<&'a Value> {
        self.known.push(name);
        self.map.get(name).filter(|v| !v.is_null())
    }

    /// Marks a field as understood without reading it (fields handled elsewhere or ignored).
    pub fn allow(&mut self, name: &'static str) {
        self.known.push(name);
    }

    pub fn object(&mut self, name: &'static str) -> Result<Option<Object<'a>>, ConfigError> {
        let path = self.path.field(name);
        self.value(name).map(|v| Object::new(path, v)).transpose()
    }

    pub fn string(&mut self, name: &'static str) -> Result<Option<&'a str>, ConfigError> {
        match self.value(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(self
                .path
                .field(name)
                .error(format!("expected a string, found {}", kind(other)))),
        }
    }

    pub fn required_string(&mut self, name: &'static str) -> Result<&'a str, ConfigError> {
        self.string(name)?
            .ok_or_else(|| self.path.field(name).error("is required"))
    }

    pub fn bool(&mut self, name: &'static str) -> Result<Option<bool>, ConfigError> {
        match self.value(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self
                .path
                .field(name)
                .error(format!("expected true or false, found {}", kind(other)))),
        }
    }

    /// A non-negative whole number no larger than `max`.
    pub fn u64_max(&mut self, name: &'static str, max: u64) -> Result<Option<u64>, ConfigError> {
        let path = self.path.field(name);
        self.value(name)
            .map(|v| whole_number(&path, v, max))
            .transpose()
    }

    pub fn array(&mut self, name: &'static str) -> Result<Option<&'a Vec<Value>>, ConfigError> {
        match self.value(name) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(other) => Err(self
                .path
                .field(name)
                .error(format!("expected an array, found {}", kind(other)))),
        }
    }

    /// The fields of this object, in document order (for maps such as `headers`).
    pub fn entries(&self) -> impl Iterator<Item = (&'a String, &'a Value)> {
        self.map.iter()
    }

    /// The fields nobody asked for, for shapes that warn about them instead of failing.
    pub fn leftovers(self) -> Vec<String> {
        self.map
            .keys()
            .filter(|k| !self.known.contains(&k.as_str()))
            .map(|k| self.path.field(k).to_string())
            .collect()
    }

    /// Rejects unknown fields: a misspelt option must not silently fall back to a default.
    pub fn finish(self) -> Result<(), ConfigError> {
        match self.map.keys().find(|k| !self.known.contains(&k.as_str())) {
            None => Ok(()),
            Some(unknown) => Err(self.path.field(unknown).error(format!(
                "unknown field; expected one of: {}",
                self.known.join(", ")
            ))),
        }
    }
}

pub fn whole_number(path: &Path, v: &Value, max: u64) -> Result<u64, ConfigError> {
    match v.as_u64() {
        Some(n) if n <= max => Ok(n),
        Some(n) => Err(path.error(format!("{n} is larger than the maximum {max}"))),
        None => Err(path.error(format!(
            "expected a non-negative whole number, found {}",
            match v {
                Value::Number(n) => n.to_string(),
                other => kind(other).to_string(),
            }
        ))),
    }
}
