//! Reading a configuration as Envoy hands it over: recognise its shape, read the shape's own
//! fields and the shared options, and finish the model.

use std::cell::RefCell;

use super::de::{self, Path, Unknown};
use super::foreign::read_with_options;
use super::model::*;
use super::options;
use super::shape::{asm, higress, native};

impl Plugin {
    /// Reads the plugin configuration as Envoy hands it over, in any shape.
    pub fn parse(bytes: &[u8]) -> Result<Plugin, ConfigError> {
        let value = json(bytes)?;
        let shape = Shape::of(&value);
        let root = Path::root();
        let warnings = RefCell::new(Vec::new());
        let policies = match shape {
            Shape::Native => vec![Policy {
                scope: None,
                config: read_native(&value)?,
            }],
            Shape::Asm => {
                let (asm, options) = read_with_options::<asm::Asm>(&value, &root, &[], &warnings)?;
                vec![Policy {
                    scope: None,
                    config: asm.into_builder(&root)?.options(&root, options)?.finish(),
                }]
            }
            Shape::Higress => higress::parse(&value, &warnings)?,
        };
        let mut warnings = warnings.into_inner();
        if policies
            .first()
            .is_some_and(|p| p.config.service.protocol == Protocol::EnvoyRls)
        {
            warnings.push("`service.protocol`: \"envoy-rls\": an engine that refuses hits past a limit (Limitador) cannot record a report that crosses it; the plugin then sends what still fits, so the budget ends spent, and the tokens beyond go uncharged (metric tokens_over_limit). envoyproxy/ratelimit records them".into());
        }
        // Only the v1 service names the limit that denied.
        for p in &policies {
            if p.config.service.protocol == Protocol::V1 {
                continue;
            }
            if let Some(l) = p.config.limits.iter().find(|l| l.deny_status.is_some()) {
                warnings.push(format!(
                    "limit `{}`: `deny_status` is not used: under protocol \"{}\" the service's answer names no limit, so every denial has `deny.status`",
                    l.name,
                    if p.config.service.protocol == Protocol::Asm { "asm" } else { "envoy-rls" }
                ));
            }
        }
        Ok(Plugin {
            shape,
            policies,
            warnings,
        })
    }
}

impl Config {
    /// Reads a configuration in the native shape (tests and tools; Envoy's goes through
    /// [`Plugin::parse`]).
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        read_native(&json(bytes)?)
    }
}

/// The native shape: its own fields and the options, every other field refused.
fn read_native(value: &serde_json::Value) -> Result<Config, ConfigError> {
    let root = Path::root();
    de::object(&root, value)?;
    let (options, option_fields) =
        de::read::<options::Options>(value, &root, &[], Unknown::Ignore)?;
    let (native, _) = de::read::<native::Native>(value, &root, option_fields, Unknown::Ignore)?;
    Ok(native
        .into_builder(&root)?
        .options(&root, options)?
        .finish())
}

fn json(bytes: &[u8]) -> Result<serde_json::Value, ConfigError> {
    let root = Path::root();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(root
            .error("the plugin configuration is empty; it needs at least `service` and `limits`"));
    }
    serde_json::from_slice(bytes).map_err(|e| root.error(format!("not valid JSON: {e}")))
}
