//! Building a [`Config`]: a shape reads its own fields into a [`Builder`], the shared options
//! are applied, and [`Builder::finish`] derives what the request path asks on every request.
//! A half-built configuration never leaves this module.

use super::de::Path;
use super::model::*;
use super::options::Options;
use crate::client_ip::{ClientIpSource, Prefixes};
use crate::limits::Limit;
use crate::matcher::RequestMatch;
use crate::template::Attribute;

/// A configuration on its way from a shape to the request path.
pub(super) struct Builder {
    config: Config,
}

impl Builder {
    /// The limits a shape read, every option at its default.
    pub fn new(service: ServiceConfig, matches: Vec<RequestMatch>, limits: Vec<Limit>) -> Builder {
        let config = Config {
            service,
            matches,
            limits,
            count: Count::Total,
            on_missing: OnMissing::Estimate,
            reserve: Reserve::Tokens(0),
            reserve_max: 0,
            reserve_default: DEFAULT_RESERVE,
            write_cap: false,
            trim_min: None,
            inject_stream_usage: true,
            stream_cutoff: false,
            stream_drain_ms: DEFAULT_STREAM_DRAIN_MS,
            deny: DenyConfig {
                status: 429,
                body: None,
                headers: Vec::new(),
            },
            quota_headers: true,
            higress_headers: false,
            client_ip: ClientIpSource::Remote,
            client_ip_prefixes: Prefixes::default(),
            consumer_header: "x-mse-consumer".into(),
            max_request_body_bytes: 1024 * 1024,
            max_pending_reports: crate::report::DEFAULT_CAPACITY,
            prices: None,
            needs_request_body: false,
            match_headers: Vec::new(),
            request_headers: Vec::new(),
            headers_after_match: Vec::new(),
        };
        Builder { config }
    }

    /// Applies the shared options given (at `path`), keeping the defaults of the others.
    pub fn options(mut self, path: &Path, options: Options) -> Result<Builder, ConfigError> {
        options.apply(path, &mut self.config)?;
        Ok(self)
    }

    /// For a shape's own words for an option (Higress's `rejected_code`), after the options.
    pub fn config(&mut self) -> &mut Config {
        &mut self.config
    }

    /// The complete configuration.
    pub fn finish(mut self) -> Config {
        derive(&mut self.config);
        self.config
    }
}

/// Computes what the hot path asks on every request.
fn derive(config: &mut Config) {
    if config.reserve_max == 0 {
        config.reserve_max = match config.service.protocol {
            Protocol::EnvoyRls => RLS_RESERVE_MAX,
            _ => wire::MAX_AMOUNT,
        };
    }
    let mut names: Vec<String> = Vec::new();
    for name in config.matches.iter().flat_map(RequestMatch::header_names) {
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    config.match_headers = names;
    // What the shell itself reads (the body's size, usage injection's route) and what
    // every key and condition reads.
    let mut read: Vec<String> = [":method", ":path", "content-length"]
        .map(String::from)
        .into();
    for limit in &config.limits {
        let attributes = limit
            .key
            .attributes()
            .chain(limit.when.iter().flat_map(|c| c.attributes()));
        for attr in attributes {
            let name =
                crate::request::headers_read(attr, &config.client_ip, &config.consumer_header);
            if let Some(name) = name.filter(|n| !read.iter().any(|r| r == n)) {
                read.push(name.to_string());
            }
        }
    }
    config.headers_after_match = read
        .iter()
        .filter(|n| !config.match_headers.contains(n))
        .cloned()
        .collect();
    config.request_headers = read;
    config.needs_request_body = config.reserve == Reserve::MaxTokens
        || config.limits.iter().any(|l| {
            // A limit in money prices the request's model.
            l.currency.is_some()
                || l.key.attributes().any(|a| *a == Attribute::Model)
                || l.when.as_ref().is_some_and(|c| c.reads_model())
        });
}
