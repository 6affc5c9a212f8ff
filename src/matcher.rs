//! Which requests are limited: `matches` entries over host, path, method and headers; and a
//! limit's own `when` conditions, which may also name the model.

use regex::Regex;

use crate::template::{Attribute, AttributeSource, RequestModel};

/// How one string is compared; the configuration names exactly one of these per matcher.
#[derive(Debug, Clone)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(Regex),
    /// Any value: the thing (a header) only has to be there.
    Present,
}

impl StringMatch {
    /// Whether `value` fits. A value whose bytes were not UTF-8 ([`crate::text::is_opaque`]) is
    /// there, and matches nothing but [`StringMatch::Present`].
    pub fn matches(&self, value: &str) -> bool {
        if crate::text::is_opaque(value) {
            return matches!(self, StringMatch::Present);
        }
        match self {
            StringMatch::Present => true,
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Contains(s) => value.contains(s.as_str()),
            StringMatch::Regex(re) => re.is_match(value),
        }
    }
}

/// One entry of `matches`: every condition it names must hold.
#[derive(Debug, Clone, Default)]
pub struct RequestMatch {
    /// Compared with the lower-cased `:authority` without its port.
    pub host: Option<StringMatch>,
    /// Compared with `:path` without its query string.
    pub path: Option<StringMatch>,
    /// Upper-case method names; empty means any method.
    pub methods: Vec<String>,
    /// Lower-case header names; an absent header never matches.
    pub headers: Vec<(String, StringMatch)>,
}

/// The parts of a request the matchers look at.
pub trait RequestHeaders {
    fn header(&self, name: &str) -> Option<&str>;
}

/// Headers as `(lower-case name, value)` pairs.
pub struct HeaderList<'a>(pub &'a [(String, String)]);

impl RequestHeaders for HeaderList<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl RequestMatch {
    /// The headers (pseudo-headers included) this matcher reads.
    pub fn header_names(&self) -> impl Iterator<Item = &str> {
        [
            self.host.as_ref().map(|_| ":authority"),
            self.path.as_ref().map(|_| ":path"),
            (!self.methods.is_empty()).then_some(":method"),
        ]
        .into_iter()
        .flatten()
        .chain(self.headers.iter().map(|(name, _)| name.as_str()))
    }

    pub fn matches(&self, req: &impl RequestHeaders) -> bool {
        if let Some(host) = &self.host {
            let authority = req.header(":authority").unwrap_or_default();
            if !host.matches(&normalize_host(authority)) {
                return false;
            }
        }
        if let Some(path) = &self.path {
            let full = req.header(":path").unwrap_or_default();
            if !path.matches(&normalize_path(full)) {
                return false;
            }
        }
        if !self.methods.is_empty() {
            let method = req.header(":method").unwrap_or_default();
            if !self.methods.iter().any(|m| m.eq_ignore_ascii_case(method)) {
                return false;
            }
        }
        self.headers
            .iter()
            .all(|(name, m)| req.header(name).is_some_and(|v| m.matches(v)))
    }
}

/// A limit's `when`: the limit applies to a request only if every condition holds. The same
/// conditions as a `matches` entry, read through the request's attributes, and the model.
#[derive(Debug, Clone)]
pub struct Condition {
    host: Option<StringMatch>,
    path: Option<StringMatch>,
    methods: Vec<String>,
    headers: Vec<(Attribute, StringMatch)>,
    /// Compared with the JSON body's `model`; an absent model never matches, one that could not
    /// be read always does.
    model: Option<StringMatch>,
}

impl Condition {
    pub fn new(request: RequestMatch, model: Option<StringMatch>) -> Condition {
        Condition {
            host: request.host,
            path: request.path,
            methods: request.methods,
            headers: request
                .headers
                .into_iter()
                .map(|(name, m)| (Attribute::Header(name), m))
                .collect(),
            model,
        }
    }

    /// The attributes the conditions read (the model aside).
    pub fn attributes(&self) -> impl Iterator<Item = &Attribute> {
        [
            self.host.as_ref().map(|_| &Attribute::Host),
            self.path.as_ref().map(|_| &Attribute::Path),
            (!self.methods.is_empty()).then_some(&Attribute::Method),
        ]
        .into_iter()
        .flatten()
        .chain(self.headers.iter().map(|(attr, _)| attr))
    }

    /// Whether the request body must be read to tell.
    pub fn reads_model(&self) -> bool {
        self.model.is_some()
    }

    pub fn holds(&self, source: &impl AttributeSource) -> bool {
        let holds = |attr: &Attribute, m: &StringMatch| {
            source.attribute(attr).is_some_and(|v| m.matches(&v))
        };
        if let Some(host) = &self.host {
            let authority = source.attribute(&Attribute::Host).unwrap_or_default();
            if !host.matches(&normalize_host(&authority)) {
                return false;
            }
        }
        if !self.methods.is_empty() {
            let method = source.attribute(&Attribute::Method).unwrap_or_default();
            if !self.methods.iter().any(|m| m.eq_ignore_ascii_case(&method)) {
                return false;
            }
        }
        self.path
            .as_ref()
            .map_or(true, |m| holds(&Attribute::Path, m))
            && self.model.as_ref().map_or(true, |m| match source.model() {
                RequestModel::Named(v) => m.matches(&v),
                // A model that could not be read may be this one: the limit applies.
                RequestModel::Unreadable => true,
                RequestModel::Absent => false,
            })
            && self.headers.iter().all(|(attr, m)| holds(attr, m))
    }
}

/// `matches` as a whole: empty admits every request, otherwise any one entry must hold.
pub fn any_matches(matches: &[RequestMatch], req: &impl RequestHeaders) -> bool {
    matches.is_empty() || matches.iter().any(|m| m.matches(req))
}

/// Host names compare case-insensitively and without the port (`API.openai.com:443`).
pub fn normalize_host(authority: &str) -> String {
    let without_port = if let Some(rest) = authority.strip_prefix('[') {
        // IPv6 literal: keep the brackets' content.
        rest.split(']').next().unwrap_or(rest)
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                authority
            }
        })
    };
    without_port.to_ascii_lowercase()
}

pub fn strip_query(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

/// `:path` as the upstreams route it, whatever Envoy's own normalisation settings: without its
/// query, percent-escapes decoded once (`%76%31` is `v1`, `%2F` is `/`), slashes merged, dot
/// segments removed (RFC 3986 §5.2.4) and a trailing slash dropped. nginx, uvicorn and most
/// servers serve every such spelling as one route, so a match, a condition or a key on the path
/// sees one spelling too. A decoded byte that is not UTF-8 is kept as [`crate::text::from_wire`] writes it.
pub fn normalize_path(path: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    let raw = strip_query(path);
    let raw = raw.split_once('#').map_or(raw, |(p, _)| p);
    let plain = !raw.contains('%')
        && !raw.contains("//")
        && !raw.contains("/.")
        && (raw.len() <= 1 || !raw.ends_with('/'));
    if plain && !crate::text::is_opaque(raw) {
        return Cow::Borrowed(raw);
    }
    let bytes = crate::text::to_bytes(raw);
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = |j: usize| bytes.get(j).and_then(|h| (*h as char).to_digit(16));
        match (b, hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                decoded.push((h << 4 | l) as u8);
                i += 3;
            }
            _ => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    // Segments, with `.` dropped and `..` taking the previous one away; empty ones (`//`)
    // merged.
    let mut segments: Vec<&[u8]> = Vec::new();
    for segment in decoded.split(|&b| b == b'/') {
        match segment {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = Vec::with_capacity(decoded.len() + 1);
    for segment in &segments {
        out.push(b'/');
        out.extend_from_slice(segment);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    Cow::Owned(crate::text::from_wire(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct H(Vec<(&'static str, &'static str)>);
    impl RequestHeaders for H {
        fn header(&self, name: &str) -> Option<&str> {
            self.0.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
        }
    }

    fn req() -> H {
        H(vec![
            (":authority", "API.OpenAI.com:443"),
            (":path", "/v1/chat/completions?x=1"),
            (":method", "POST"),
            ("x-tier", "free"),
        ])
    }

    #[test]
    fn string_matchers() {
        assert!(StringMatch::Exact("a".into()).matches("a"));
        assert!(!StringMatch::Exact("a".into()).matches("ab"));
        assert!(StringMatch::Prefix("/v1/".into()).matches("/v1/x"));
        assert!(StringMatch::Suffix(".com".into()).matches("x.com"));
        assert!(StringMatch::Contains("chat".into()).matches("/v1/chat/x"));
        let re = Regex::new("^(free|trial)$").unwrap();
        assert!(StringMatch::Regex(re.clone()).matches("trial"));
        assert!(!StringMatch::Regex(re).matches("paid"));
    }

    #[test]
    fn host_path_method_headers() {
        let m = RequestMatch {
            host: Some(StringMatch::Exact("api.openai.com".into())),
            path: Some(StringMatch::Exact("/v1/chat/completions".into())),
            methods: vec!["POST".into()],
            headers: vec![("x-tier".into(), StringMatch::Prefix("fr".into()))],
        };
        assert!(m.matches(&req()));
        let mut wrong_method = m.clone();
        wrong_method.methods = vec!["GET".into()];
        assert!(!wrong_method.matches(&req()));
        let mut missing_header = m.clone();
        missing_header.headers = vec![("x-absent".into(), StringMatch::Prefix("".into()))];
        assert!(!missing_header.matches(&req()));
    }

    #[test]
    fn a_model_condition_holds_for_a_model_nobody_could_read() {
        struct Model(Option<&'static str>);
        impl AttributeSource for Model {
            fn attribute(&self, attr: &Attribute) -> Option<std::borrow::Cow<'_, str>> {
                match attr {
                    Attribute::Model => self.0.map(Into::into),
                    _ => None,
                }
            }
        }
        struct Unreadable;
        impl AttributeSource for Unreadable {
            fn attribute(&self, _: &Attribute) -> Option<std::borrow::Cow<'_, str>> {
                None
            }
            fn model(&self) -> RequestModel<'_> {
                RequestModel::Unreadable
            }
        }
        let gpt4o = Condition::new(
            RequestMatch::default(),
            Some(StringMatch::Exact("gpt-4o".into())),
        );
        assert!(gpt4o.holds(&Model(Some("gpt-4o"))));
        assert!(!gpt4o.holds(&Model(Some("gpt-4o-mini"))));
        assert!(!gpt4o.holds(&Model(None)), "no model at all");
        assert!(gpt4o.holds(&Unreadable));
        // A client naming the placeholder is not an unreadable body.
        assert!(!gpt4o.holds(&Model(Some(crate::template::UNREADABLE_MODEL))));
    }

    #[test]
    fn empty_matches_admit_everything() {
        assert!(any_matches(&[], &req()));
        let no = RequestMatch {
            methods: vec!["GET".into()],
            ..Default::default()
        };
        let yes = RequestMatch::default();
        assert!(!any_matches(std::slice::from_ref(&no), &req()));
        assert!(any_matches(&[no, yes], &req()));
    }

    /// Every spelling nginx or uvicorn serves as `/v1/chat/completions` is that path.
    #[test]
    fn paths_are_normalised_as_upstreams_route_them() {
        for spelling in [
            "/v1/chat/completions",
            "/v1/chat/completions?x=1",
            "//v1/chat/completions",
            "/v1//chat/completions",
            "/v1/./chat/completions",
            "/v1/x/../chat/completions",
            "/%76%31/chat/completions",
            "/v1/chat%2Fcompletions",
            "/v1/chat%2fcompletions",
            "/v1/%2e/chat/completions",
            "/v1/x/%2E%2E/chat/completions",
            "/v1/chat/completions/",
            "/../v1/chat/completions",
            "/v1/chat/completions#frag",
        ] {
            assert_eq!(
                normalize_path(spelling),
                "/v1/chat/completions",
                "{spelling}"
            );
        }
        assert!(matches!(
            normalize_path("/v1/chat/completions?a=%2F"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(normalize_path("/"), "/");
        assert_eq!(normalize_path("/.."), "/");
        assert_eq!(normalize_path("/a%zz"), "/a%zz");
        assert!(crate::text::is_opaque(&normalize_path("/a%ff")));
        let m = RequestMatch {
            path: Some(StringMatch::Prefix("/v1/chat/".into())),
            ..Default::default()
        };
        assert!(m.matches(&H(vec![(":path", "/v1//chat/../chat/completions")])));
    }

    #[test]
    fn hosts_are_normalised() {
        assert_eq!(normalize_host("Example.COM:8080"), "example.com");
        assert_eq!(normalize_host("example.com"), "example.com");
        assert_eq!(normalize_host("[::1]:80"), "::1");
        assert_eq!(strip_query("/a?b=c"), "/a");
    }
}
