//! Reading an object of a foreign shape (ASM, Higress), whose unknown fields are warned about
//! rather than refused.

use std::cell::RefCell;

use super::de::{self, Path, Unknown};
use super::model::ConfigError;
use super::options;

/// Reads an object of a foreign shape in two passes: the shared options, then the shape's own
/// fields, with `also` the fields a third pass reads. Fields none of them reads are warned about.
pub(super) fn read_with_options<T: serde::de::DeserializeOwned>(
    value: &serde_json::Value,
    path: &Path,
    also: &[&'static str],
    warnings: &RefCell<Vec<String>>,
) -> Result<(T, options::Options), ConfigError> {
    de::object(path, value)?;
    let (options, option_fields) = de::read::<options::Options>(value, path, &[], Unknown::Ignore)?;
    let others: Vec<&'static str> = option_fields.iter().chain(also).copied().collect();
    let (shape, _) = de::read::<T>(value, path, &others, Unknown::Warn(warnings))?;
    Ok((shape, options))
}
