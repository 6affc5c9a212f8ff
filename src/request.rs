//! One request as the core sees it: headers, a few facts from the JSON body, Envoy properties.

use std::borrow::Cow;

use crate::body::path_model;
pub use crate::body::BodyFacts;
use crate::client_ip::{client_ip, client_key, ClientIpSource, Prefixes};
use crate::matcher::{normalize_path, RequestHeaders};
use crate::template::{Attribute, AttributeSource, RequestModel, MAX_RENDERINGS, UNREADABLE_MODEL};
use crate::text::{from_wire, to_bytes};

/// Whether a request may be an OpenAI-style (chat) completion, whose stream carries usage only
/// when asked: `POST …/completions`. Anthropic, Gemini and the Responses API always report
/// usage and reject the extra field, so they are left alone.
pub fn may_need_stream_usage(method: Option<&str>, path: Option<&str>) -> bool {
    method == Some("POST") && path.is_some_and(|p| normalize_path(p).ends_with("/completions"))
}

fn is_credentials_header(name: &str) -> bool {
    name.eq_ignore_ascii_case("authorization") || name.eq_ignore_ascii_case("proxy-authorization")
}

/// `Authorization` as one spelling per credential. The scheme is case-insensitive and may be
/// followed by several spaces (RFC 9110 §11.4), so `bEaReR   sk-1` reaches an upstream as the
/// same key as `Bearer sk-1`; as a rate-limit key it must be the same too, or each spelling
/// would be a fresh budget. Well-known schemes take their usual spelling, others are kept. Read
/// from the header's bytes: a credential that is not UTF-8 is keyed by its bytes.
fn canonical_credentials(value: &str) -> Cow<'_, str> {
    let bytes = to_bytes(value);
    let is_space = |b: &u8| *b == b' ' || *b == b'\t';
    let trimmed = trim_bytes(&bytes);
    let Some(cut) = trimmed.iter().position(is_space) else {
        return if trimmed.len() == bytes.len() {
            Cow::Borrowed(value)
        } else {
            Cow::Owned(from_wire(trimmed.to_vec()))
        };
    };
    let (scheme, rest) = trimmed.split_at(cut);
    let start = rest.iter().position(|b| !is_space(b)).unwrap_or(rest.len());
    let credentials = rest.get(start..).unwrap_or_default();
    let canonical = ["Bearer", "Basic", "Digest", "DPoP"]
        .into_iter()
        .map(str::as_bytes)
        .find(|known| known.eq_ignore_ascii_case(scheme))
        .unwrap_or(scheme);
    // HTTP Basic: every base64 spelling of one `user:password` (padding or not, stray bytes a
    // lenient decoder skips, the URL-safe alphabet) is one credential, keyed by its user.
    if canonical == b"Basic" {
        let decoded = lenient_base64(credentials);
        let user = split_at_byte(&decoded, b':').map_or(decoded.as_slice(), |(user, _)| user);
        return Cow::Owned(from_wire([b"Basic ".as_slice(), user].concat()));
    }
    // Already canonical: nothing around it, one space after the scheme.
    if canonical == scheme
        && bytes.len() == scheme.len() + 1 + credentials.len()
        && bytes.get(scheme.len()) == Some(&b' ')
    {
        return Cow::Borrowed(value);
    }
    Cow::Owned(from_wire([canonical, b" ", credentials].concat()))
}

/// Base64 as lenient decoders read it (Python's `b64decode` without `validate`, as FastAPI's
/// `HTTPBasic` does): bytes outside the standard alphabet (`-` and `_` included) are skipped,
/// padding is optional.
fn lenient_base64(text: &[u8]) -> Vec<u8> {
    let sextet = |b: u8| match b {
        b'A'..=b'Z' => Some(b - b'A'),
        b'a'..=b'z' => Some(b - b'a' + 26),
        b'0'..=b'9' => Some(b - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for v in text.iter().copied().filter_map(sextet) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// Reads Envoy attributes by path (`["source", "address"]`); the adapter supplies it.
pub trait Properties {
    fn property(&self, path: &[&str]) -> Option<String>;
}

/// What the plugin knows of the request body.
#[derive(Debug, Clone, Copy)]
pub enum RequestBody<'a> {
    /// There is none, or no limit needs it.
    Absent,
    /// There is one but it could not be read (larger than `max_request_body_bytes`, not JSON,
    /// ended by trailers): its model is unknown, not absent.
    Unreadable,
    Read(&'a BodyFacts),
}

impl<'a> RequestBody<'a> {
    pub fn facts(self) -> Option<&'a BodyFacts> {
        match self {
            RequestBody::Read(facts) => Some(facts),
            RequestBody::Absent | RequestBody::Unreadable => None,
        }
    }
}

/// A request's attributes, looked up on demand so that unused ones cost nothing.
pub struct RequestView<'a, P: Properties> {
    /// Request headers with lower-case names, pseudo-headers included.
    pub headers: &'a [(String, String)],
    pub body: RequestBody<'a>,
    pub client_ip: &'a ClientIpSource,
    /// How much of an address is one client in keys.
    pub client_ip_prefixes: Prefixes,
    pub consumer_header: &'a str,
    pub properties: &'a P,
}

impl<P: Properties> RequestHeaders for RequestView<'_, P> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl<P: Properties> AttributeSource for RequestView<'_, P> {
    fn model(&self) -> RequestModel<'_> {
        // Gemini and Vertex AI name the model in the path, which they route by.
        let path = self.header(":path").map(normalize_path);
        if let Some(model) = path.as_deref().and_then(path_model) {
            return RequestModel::Named(Cow::Owned(model.to_string()));
        }
        match self.body {
            RequestBody::Read(facts) => facts.model.as_deref().map_or(RequestModel::Absent, |m| {
                RequestModel::Named(Cow::Borrowed(m))
            }),
            RequestBody::Unreadable => RequestModel::Unreadable,
            RequestBody::Absent => RequestModel::Absent,
        }
    }

    fn client_address(&self) -> Option<std::net::IpAddr> {
        let peer = self.properties.property(&["source", "address"]);
        let forwarded = match self.client_ip {
            ClientIpSource::Remote => None,
            ClientIpSource::Header { name, .. } => self.header(name),
        };
        // Only the chosen entry must be an address: bytes elsewhere change nothing.
        let forwarded = forwarded.map(|f| String::from_utf8_lossy(&to_bytes(f)).into_owned());
        client_ip(self.client_ip, peer.as_deref(), forwarded.as_deref())
    }

    /// A query parameter or cookie a client repeats with different values is counted against
    /// each of them: upstreams disagree on which one they read (Starlette and Python's
    /// `SimpleCookie` take the last, Go and Node the first), so whichever it is, its budget is
    /// checked and charged.
    fn attribute_values(&self, attr: &Attribute) -> Vec<Cow<'_, str>> {
        let values = match attr {
            Attribute::Query(name) => self
                .header(":path")
                .map_or_else(Vec::new, |p| query_values(p, name)),
            Attribute::Cookie(name) => self
                .header("cookie")
                .map_or_else(Vec::new, |c| cookie_values(c, name)),
            _ => return self.attribute(attr).into_iter().collect(),
        };
        values.into_iter().map(Cow::Owned).collect()
    }

    fn attribute(&self, attr: &Attribute) -> Option<Cow<'_, str>> {
        match attr {
            Attribute::Header(name) => {
                let value = self.header(name)?;
                Some(if is_credentials_header(name) {
                    canonical_credentials(value)
                } else {
                    Cow::Borrowed(value)
                })
            }
            Attribute::Query(name) => query_param(self.header(":path")?, name).map(Cow::Owned),
            Attribute::Cookie(name) => cookie(self.header("cookie")?, name).map(Cow::Owned),
            Attribute::Host => self.header(":authority").map(Cow::Borrowed),
            Attribute::Path => self.header(":path").map(normalize_path),
            Attribute::Method => self.header(":method").map(Cow::Borrowed),
            Attribute::SourceIp => self
                .client_address()
                .map(|ip| Cow::Owned(client_key(ip, self.client_ip_prefixes))),
            Attribute::SourceAddress => self
                .properties
                .property(&["source", "address"])
                .map(Cow::Owned),
            Attribute::Consumer => self.header(self.consumer_header).map(Cow::Borrowed),
            Attribute::Model => match self.model() {
                RequestModel::Named(model) => Some(model),
                RequestModel::Unreadable => Some(Cow::Borrowed(UNREADABLE_MODEL)),
                RequestModel::Absent => None,
            },
            Attribute::Route => self
                .properties
                .property(&["xds", "route_name"])
                .or_else(|| self.properties.property(&["route_name"]))
                .map(Cow::Owned),
            Attribute::Property(path) => {
                let path: Vec<&str> = path.iter().map(String::as_str).collect();
                self.properties.property(&path).map(Cow::Owned)
            }
        }
    }
}

/// The request headers [`RequestView::attribute`] reads for `attr` (it reads no other): the
/// shell takes these alone out of the request's header map. Keep the two in step.
pub fn headers_read<'a>(
    attr: &'a Attribute,
    client_ip: &'a ClientIpSource,
    consumer_header: &'a str,
) -> Option<&'a str> {
    match attr {
        Attribute::Header(name) => Some(name),
        Attribute::Query(_) | Attribute::Path => Some(":path"),
        Attribute::Cookie(_) => Some("cookie"),
        Attribute::Host => Some(":authority"),
        Attribute::Method => Some(":method"),
        Attribute::SourceIp => match client_ip {
            ClientIpSource::Remote => None,
            ClientIpSource::Header { name, .. } => Some(name),
        },
        Attribute::Consumer => Some(consumer_header),
        Attribute::SourceAddress | Attribute::Model | Attribute::Route | Attribute::Property(_) => {
            None
        }
    }
}

/// `bytes` split at the first `sep`.
fn split_at_byte(bytes: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let i = bytes.iter().position(|&b| b == sep)?;
    Some((&bytes[..i], &bytes[i + 1..]))
}

fn trim_bytes(bytes: &[u8]) -> &[u8] {
    let is_space = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes
        .iter()
        .position(|b| !is_space(b))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_space(b))
        .map_or(start, |e| e + 1);
    bytes.get(start..end).unwrap_or_default()
}

/// Distinct values in order, at most [`MAX_RENDERINGS`]: past that, the first ones and always
/// the last (the two an upstream reads: Go and Node take the first, Starlette the last), so
/// padding a parameter with throw-away values never leaves the real one uncounted.
fn distinct(values: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut last: Option<String> = None;
    for v in values {
        if out.contains(&v) {
            continue;
        }
        if out.len() < MAX_RENDERINGS - 1 {
            out.push(v);
        } else {
            last = Some(v);
        }
    }
    out.extend(last);
    out
}

/// The values of query parameter `name` in `path`, percent-decoded (`+` is a space), distinct,
/// in order. Read from the path's bytes, so a byte that is not UTF-8 elsewhere in the path
/// changes nothing, and a value that is not UTF-8 is keyed by its bytes ([`from_wire`]).
pub fn query_values(path: &str, name: &str) -> Vec<String> {
    let path = to_bytes(path);
    let Some((_, query)) = split_at_byte(&path, b'?') else {
        return Vec::new();
    };
    let query = split_at_byte(query, b'#').map_or(query, |(q, _)| q);
    distinct(query.split(|&b| b == b'&').filter_map(|pair| {
        let (k, v) = split_at_byte(pair, b'=').unwrap_or((pair, b""));
        (*percent_decode(k) == *name.as_bytes()).then(|| from_wire(percent_decode(v).into_owned()))
    }))
}

/// The first value of query parameter `name` (see [`query_values`]).
pub fn query_param(path: &str, name: &str) -> Option<String> {
    query_values(path, name).into_iter().next()
}

/// The values of cookie `name` in a `Cookie` header, read from its bytes, distinct, in order.
pub fn cookie_values(header: &str, name: &str) -> Vec<String> {
    let header = to_bytes(header);
    distinct(header.split(|&b| b == b';').filter_map(|pair| {
        let (k, v) = split_at_byte(pair, b'=')?;
        (trim_bytes(k) == name.as_bytes()).then(|| {
            let v = trim_bytes(v);
            let v = v.strip_prefix(b"\"").unwrap_or(v);
            let v = v.strip_suffix(b"\"").unwrap_or(v);
            from_wire(v.to_vec())
        })
    }))
}

/// The first value of cookie `name` (see [`cookie_values`]).
pub fn cookie(header: &str, name: &str) -> Option<String> {
    cookie_values(header, name).into_iter().next()
}

fn percent_decode(s: &[u8]) -> Cow<'_, [u8]> {
    if !s.iter().any(|&b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while let Some(&b) = s.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => match (s.get(i + 1).and_then(hex), s.get(i + 2).and_then(hex)) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(out)
}

fn hex(b: &u8) -> Option<u8> {
    (*b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Props;
    impl Properties for Props {
        fn property(&self, path: &[&str]) -> Option<String> {
            match path {
                ["source", "address"] => Some("[2001:db8::5]:40000".into()),
                ["xds", "route_name"] => Some("chat".into()),
                ["xds", "cluster_name"] => Some("openai".into()),
                _ => None,
            }
        }
    }

    fn headers() -> Vec<(String, String)> {
        [
            (":authority", "api.example.com"),
            (":path", "/v1/chat?apikey=a%2Bb+c&x=1"),
            (":method", "POST"),
            ("cookie", "sid=abc; uid=\"u-1\""),
            ("x-mse-consumer", "team-a"),
            ("x-forwarded-for", "6.6.6.6, 7.7.7.7"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn get(view: &RequestView<'_, Props>, attr: &str) -> Option<String> {
        view.attribute(&Attribute::parse(attr).unwrap())
            .map(Cow::into_owned)
    }

    #[test]
    fn every_attribute_resolves() {
        let h = headers();
        let body = BodyFacts::parse(br#"{"model":"gpt-4o"}"#).unwrap();
        let remote = ClientIpSource::Remote;
        let view = RequestView {
            headers: &h,
            body: RequestBody::Read(&body),
            client_ip: &remote,
            client_ip_prefixes: Prefixes::default(),
            consumer_header: "x-mse-consumer",
            properties: &Props,
        };
        assert_eq!(get(&view, "request.query.apikey").as_deref(), Some("a+b c"));
        assert_eq!(get(&view, "request.query.x").as_deref(), Some("1"));
        assert_eq!(get(&view, "request.query.nope"), None);
        assert_eq!(get(&view, "request.cookies.uid").as_deref(), Some("u-1"));
        assert_eq!(
            get(&view, "request.host").as_deref(),
            Some("api.example.com")
        );
        assert_eq!(get(&view, "request.path").as_deref(), Some("/v1/chat"));
        assert_eq!(get(&view, "request.method").as_deref(), Some("POST"));
        assert_eq!(
            get(&view, "source.ip").as_deref(),
            Some("2001:db8::/64"),
            "the client's /64"
        );
        assert_eq!(
            get(&view, "source.address").as_deref(),
            Some("[2001:db8::5]:40000")
        );
        assert_eq!(get(&view, "consumer").as_deref(), Some("team-a"));
        assert_eq!(get(&view, "llm.model").as_deref(), Some("gpt-4o"));
        assert_eq!(get(&view, "route").as_deref(), Some("chat"));
        assert_eq!(get(&view, "xds.cluster_name").as_deref(), Some("openai"));
        assert_eq!(
            get(&view, "request.headers.X-Forwarded-For").as_deref(),
            Some("6.6.6.6, 7.7.7.7")
        );

        let xff = ClientIpSource::Header {
            name: "x-forwarded-for".into(),
            trusted_hops: 1,
        };
        let view = RequestView {
            client_ip: &xff,
            body: RequestBody::Absent,
            ..view
        };
        assert_eq!(get(&view, "source.ip").as_deref(), Some("7.7.7.7"));
        assert_eq!(get(&view, "llm.model"), None);
        // A body that could not be read has a model nobody knows, not none.
        let view = RequestView {
            body: RequestBody::Unreadable,
            ..view
        };
        assert_eq!(get(&view, "llm.model").as_deref(), Some(UNREADABLE_MODEL));
        // Gemini's path names the model, whatever the body says (or fails to).
        let gemini = vec![(
            ":path".to_string(),
            "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse".to_string(),
        )];
        let view = RequestView {
            headers: &gemini,
            ..view
        };
        assert_eq!(get(&view, "llm.model").as_deref(), Some("gemini-2.5-pro"));
    }

    #[test]
    fn every_spelling_of_a_credential_is_one_key() {
        for spelling in [
            "Bearer sk-1",
            "bearer sk-1",
            "BEARER  sk-1",
            " bEaReR\t sk-1 ",
        ] {
            assert_eq!(
                canonical_credentials(spelling),
                "Bearer sk-1",
                "{spelling:?}"
            );
        }
        assert!(matches!(
            canonical_credentials("Bearer sk-1"),
            Cow::Borrowed(_)
        ));
        // The credential itself is case-sensitive; unknown schemes are kept as sent.
        assert_eq!(canonical_credentials("Bearer SK-1"), "Bearer SK-1");
        assert_eq!(canonical_credentials("Custom  x"), "Custom x");
        assert_eq!(canonical_credentials("sk-1"), "sk-1");
        assert_eq!(canonical_credentials(""), "");
        // Basic: one user, however its base64 is spelled; the password is not part of the key.
        for spelling in [
            "Basic YWxpY2U6c2VjcmV0",     // alice:secret
            "basic YWxpY2U6c2VjcmV0====", // padded
            "BASIC  YWxp Y2U6\tc2VjcmV0", // stray spaces and a tab
            "Basic YWxpY2U6b3RoZXI=",     // alice:other
            "Basic YWxpY2U=",             // alice, no password
        ] {
            assert_eq!(
                canonical_credentials(spelling),
                "Basic alice",
                "{spelling:?}"
            );
        }
        assert_eq!(lenient_base64(b"Ym9i-_"), b"bob");
        assert_eq!(
            canonical_credentials("Basic -YWxp_Y2U6c2VjcmV0"),
            "Basic alice"
        );
        assert!(crate::text::is_opaque(&canonical_credentials("Basic //79")));
        assert!(
            is_credentials_header("Authorization") && is_credentials_header("proxy-authorization")
        );
        assert!(!is_credentials_header("x-api-key"));
    }

    #[test]
    fn repeated_query_parameters_and_cookies_have_every_value() {
        assert_eq!(
            query_values("/x?k=a&j=1&k=b&k=a&k=%62&k", "k"),
            ["a", "b", ""]
        );
        assert_eq!(query_param("/x?k=a&k=b", "k").as_deref(), Some("a"));
        assert_eq!(
            cookie_values("sid=a; x=1; sid=\"b\"; sid=a", "sid"),
            ["a", "b"]
        );
        let many: String = (0..10).map(|i| format!("k={i}&")).collect();
        assert_eq!(
            query_values(&format!("/x?{many}"), "k").len(),
            MAX_RENDERINGS
        );
        let h: Vec<(String, String)> = vec![
            (":path".into(), "/v1/chat?apikey=random&apikey=real".into()),
            ("cookie".into(), "sid=s1; sid=s2".into()),
        ];
        let remote = ClientIpSource::Remote;
        let view = RequestView {
            headers: &h,
            body: RequestBody::Absent,
            client_ip: &remote,
            client_ip_prefixes: Prefixes::default(),
            consumer_header: "x",
            properties: &Props,
        };
        let key =
            crate::template::Template::parse("{{request.query.apikey}}/{{request.cookies.sid}}")
                .unwrap();
        assert_eq!(
            key.render_all(&view),
            ["random/s1", "random/s2", "real/s1", "real/s2"]
        );
    }

    #[test]
    fn stream_usage_is_for_completions() {
        assert!(may_need_stream_usage(
            Some("POST"),
            Some("/v1/chat/completions?x=1")
        ));
        assert!(may_need_stream_usage(
            Some("POST"),
            Some("/compatible-mode/v1/completions")
        ));
        assert!(!may_need_stream_usage(
            Some("GET"),
            Some("/v1/chat/completions")
        ));
        assert!(!may_need_stream_usage(Some("POST"), Some("/v1/messages")));
        assert!(!may_need_stream_usage(Some("POST"), Some("/v1/responses")));
    }

    #[test]
    fn percent_decoding_is_safe() {
        let decode = |s: &str| from_wire(percent_decode(s.as_bytes()).into_owned());
        assert_eq!(decode("%41%zz%4"), "A%zz%4");
        assert_eq!(decode("%"), "%");
        assert_eq!(decode("%e4%b8%ad"), "中");
        // Bytes that are not UTF-8 are kept apart, not merged into U+FFFD.
        assert_ne!(decode("%ff"), decode("%fe"));
        assert!(crate::text::is_opaque(&decode("%ff")));
    }
}
