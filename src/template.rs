//! Rate-limit keys as templates: literal text plus `{{attribute}}` placeholders.

use std::borrow::Cow;

/// A request attribute a key can name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attribute {
    /// `request.headers.<name>` (name lower-cased, as Envoy stores headers).
    Header(String),
    /// `request.query.<name>`, percent-decoded.
    Query(String),
    /// `request.cookies.<name>`.
    Cookie(String),
    Host,
    Path,
    Method,
    /// The client address per `client_ip` (peer or `X-Forwarded-For`), without port.
    SourceIp,
    /// The peer address as Envoy reports it, with port.
    SourceAddress,
    /// The consumer named by `consumer_header`.
    Consumer,
    /// `model` from the JSON request body.
    Model,
    /// Envoy's `route_name`.
    Route,
    /// Any other Envoy attribute, read with `get_property` (`connection.requested_server_name`).
    Property(Vec<String>),
}

impl Attribute {
    pub fn parse(text: &str) -> Result<Attribute, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("empty placeholder `{{}}`".into());
        }
        if text.contains(|c: char| c.is_whitespace() || c == '{' || c == '}') {
            return Err(format!("invalid attribute `{text}`"));
        }
        let named = |prefix: &str| -> Result<Option<String>, String> {
            match text.strip_prefix(prefix) {
                None => Ok(None),
                Some("") => Err(format!("`{text}` needs a name after `{prefix}`")),
                Some(name) => Ok(Some(name.to_string())),
            }
        };
        if let Some(name) = named("request.headers.")? {
            return Ok(Attribute::Header(name.to_ascii_lowercase()));
        }
        if let Some(name) = named("request.query.")? {
            return Ok(Attribute::Query(name));
        }
        if let Some(name) = named("request.cookies.")? {
            return Ok(Attribute::Cookie(name));
        }
        Ok(match text {
            "request.host" => Attribute::Host,
            "request.path" => Attribute::Path,
            "request.method" => Attribute::Method,
            "source.ip" => Attribute::SourceIp,
            "source.address" => Attribute::SourceAddress,
            "consumer" => Attribute::Consumer,
            "llm.model" => Attribute::Model,
            "route" => Attribute::Route,
            other => {
                let parts: Vec<String> = other.split('.').map(str::to_string).collect();
                if parts.iter().any(String::is_empty) {
                    return Err(format!("invalid attribute `{other}`"));
                }
                Attribute::Property(parts)
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Attr(Attribute),
}

/// A parsed key template. An empty template is a global key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Template {
    parts: Vec<Part>,
}

/// The model a request names, as far as the plugin could read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestModel<'a> {
    /// The request names none (no body, or a body without `model`).
    Absent,
    /// There is a body the plugin could not read: its model is unknown, not absent. Such a
    /// request is no way around a model's limit: a `when.model` condition holds for it.
    Unreadable,
    Named(Cow<'a, str>),
}

/// `{{llm.model}}` of a request whose body could not be read: such requests are counted
/// together under this value.
pub const UNREADABLE_MODEL: &str = "(unreadable)";

/// Where templates get attribute values from; `None` means the attribute is absent.
pub trait AttributeSource {
    fn attribute(&self, attr: &Attribute) -> Option<Cow<'_, str>>;

    /// The request's model; by default the `llm.model` attribute, named or absent.
    fn model(&self) -> RequestModel<'_> {
        self.attribute(&Attribute::Model)
            .map_or(RequestModel::Absent, RequestModel::Named)
    }

    /// The client's whole address, which `source.ip` keys group by prefix: address and CIDR
    /// rules match it, not the group.
    fn client_address(&self) -> Option<std::net::IpAddr> {
        None
    }

    /// Every value the attribute has, distinct, the one [`AttributeSource::attribute`] gives
    /// first: a source a client may repeat with different values (a query parameter, a cookie)
    /// has several, since upstreams disagree on which one counts.
    fn attribute_values(&self, attr: &Attribute) -> Vec<Cow<'_, str>> {
        self.attribute(attr).into_iter().collect()
    }
}

/// The most values one key renders to for one request (a repeated query parameter or cookie
/// is counted against each of its values, up to this many).
pub const MAX_RENDERINGS: usize = 4;

impl Template {
    /// Whether the template is this one attribute alone (`{{source.ip}}`).
    pub fn is_only(&self, attr: &Attribute) -> bool {
        matches!(self.parts.as_slice(), [Part::Attr(a)] if a == attr)
    }

    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                parts.push(Part::Literal(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| format!("unclosed `{{{{` in `{text}`"))?;
            parts.push(Part::Attr(Attribute::parse(&after[..end])?));
            rest = &after[end + 2..];
        }
        if rest.contains("}}") {
            return Err(format!("`}}}}` without `{{{{` in `{text}`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(Template { parts })
    }

    pub fn attributes(&self) -> impl Iterator<Item = &Attribute> {
        self.parts.iter().filter_map(|p| match p {
            Part::Attr(a) => Some(a),
            Part::Literal(_) => None,
        })
    }

    /// Every value of the key for this request, at most [`MAX_RENDERINGS`]: one per combination
    /// of the values its attributes have (usually exactly one); none when an attribute is absent.
    pub fn render_all(&self, source: &impl AttributeSource) -> Vec<String> {
        let mut outs = vec![String::new()];
        for part in &self.parts {
            match part {
                Part::Literal(s) => outs.iter_mut().for_each(|o| o.push_str(s)),
                Part::Attr(a) => {
                    let values = source.attribute_values(a);
                    if let [only] = values.as_slice() {
                        outs.iter_mut().for_each(|o| o.push_str(only));
                        continue;
                    }
                    let mut next = Vec::new();
                    for o in &outs {
                        for v in &values {
                            if next.len() < MAX_RENDERINGS {
                                next.push(format!("{o}{v}"));
                            }
                        }
                    }
                    outs = next;
                }
            }
        }
        outs
    }

    /// The key's value, or `None` when any attribute it names is absent (the limit is skipped).
    pub fn render(&self, source: &impl AttributeSource) -> Option<String> {
        if let [Part::Attr(a)] = self.parts.as_slice() {
            return source.attribute(a).map(Cow::into_owned);
        }
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Attr(a) => out.push_str(&source.attribute(a)?),
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Src;
    impl AttributeSource for Src {
        fn attribute(&self, attr: &Attribute) -> Option<Cow<'_, str>> {
            match attr {
                Attribute::Header(h) if h == "x-user" => Some("alice".into()),
                Attribute::Model => Some("gpt-4o".into()),
                Attribute::Property(p) if p == &["node", "id"] => Some("n1".into()),
                _ => None,
            }
        }
    }

    #[test]
    fn parses_and_renders() {
        let t = Template::parse("user:{{ request.headers.X-User }}/{{llm.model}}").unwrap();
        assert_eq!(t.render(&Src).as_deref(), Some("user:alice/gpt-4o"));
        assert_eq!(
            Template::parse("{{node.id}}")
                .unwrap()
                .render(&Src)
                .as_deref(),
            Some("n1")
        );
        assert_eq!(
            Template::parse("").unwrap().render(&Src).as_deref(),
            Some("")
        );
        assert_eq!(
            Template::parse("fixed").unwrap().render(&Src).as_deref(),
            Some("fixed")
        );
    }

    #[test]
    fn absent_attribute_skips_the_key() {
        let t = Template::parse("{{request.headers.x-user}}:{{request.query.k}}").unwrap();
        assert_eq!(t.render(&Src), None);
    }

    #[test]
    fn every_attribute_kind_parses() {
        for (text, want) in [
            ("request.query.apikey", Attribute::Query("apikey".into())),
            ("request.cookies.sid", Attribute::Cookie("sid".into())),
            ("request.host", Attribute::Host),
            ("request.path", Attribute::Path),
            ("request.method", Attribute::Method),
            ("source.ip", Attribute::SourceIp),
            ("source.address", Attribute::SourceAddress),
            ("consumer", Attribute::Consumer),
            ("llm.model", Attribute::Model),
            ("route", Attribute::Route),
        ] {
            assert_eq!(Attribute::parse(text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn rejects_malformed_templates() {
        for bad in [
            "{{",
            "{{request.headers.}}",
            "a}}",
            "{{}}",
            "{{a b}}",
            "{{a..b}}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad}");
        }
    }
}
