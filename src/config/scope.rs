//! Which requests a scoped policy applies to: Higress `matchRules`, which Higress hands to the
//! plugin as `_rules_` entries with `_match_route_`, `_match_domain_` and `_match_service_`.

/// The request facts a scope looks at, fetched only when a scope asks.
pub trait ScopeFacts {
    /// The route's name (`xds.route_name`).
    fn route(&mut self) -> Option<String>;
    /// The request's host, without port.
    fn host(&mut self) -> Option<String>;
    /// The upstream cluster (`xds.cluster_name`), e.g. `outbound|80||llm.default.svc.cluster.local`.
    fn cluster(&mut self) -> Option<String>;
}

/// Every dimension given must match; an empty one is not a constraint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub routes: Vec<String>,
    /// Exact hosts or `*.suffix` wildcards, lower-case.
    pub domains: Vec<String>,
    /// `host`, `host:port` or a raw cluster name.
    pub services: Vec<String>,
}

impl Scope {
    pub fn matches(&self, facts: &mut impl ScopeFacts) -> bool {
        if !self.routes.is_empty() {
            let Some(route) = facts.route() else {
                return false;
            };
            if !self.routes.contains(&route) {
                return false;
            }
        }
        if !self.domains.is_empty() {
            let Some(host) = facts.host() else {
                return false;
            };
            let host = host.to_ascii_lowercase();
            if !self.domains.iter().any(|d| domain_matches(d, &host)) {
                return false;
            }
        }
        if !self.services.is_empty() {
            let Some(cluster) = facts.cluster() else {
                return false;
            };
            let names = service_names(&cluster);
            if !self.services.iter().any(|s| names.contains(s)) {
                return false;
            }
        }
        true
    }
}

fn domain_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
        None => pattern == host,
    }
}

/// The names a service may be given by: the raw cluster, and for Istio/Higress clusters
/// (`outbound|<port>|<subset>|<host>`) `host` and `host:port`.
fn service_names(cluster: &str) -> Vec<String> {
    let mut names = vec![cluster.to_string()];
    let parts: Vec<&str> = cluster.split('|').collect();
    if let ["outbound", port, _subset, host] = parts.as_slice() {
        names.push(host.to_string());
        names.push(format!("{host}:{port}"));
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Facts(&'static str, &'static str, &'static str);

    impl ScopeFacts for Facts {
        fn route(&mut self) -> Option<String> {
            Some(self.0.to_string()).filter(|s| !s.is_empty())
        }
        fn host(&mut self) -> Option<String> {
            Some(self.1.to_string())
        }
        fn cluster(&mut self) -> Option<String> {
            Some(self.2.to_string())
        }
    }

    #[test]
    fn dimensions() {
        let f = || {
            Facts(
                "chat",
                "api.example.com",
                "outbound|8080||qwen.default.svc.cluster.local",
            )
        };
        let by = |routes: &[&str], domains: &[&str], services: &[&str]| Scope {
            routes: routes.iter().map(|s| s.to_string()).collect(),
            domains: domains.iter().map(|s| s.to_string()).collect(),
            services: services.iter().map(|s| s.to_string()).collect(),
        };
        assert!(by(&[], &[], &[]).matches(&mut f()));
        assert!(by(&["x", "chat"], &[], &[]).matches(&mut f()));
        assert!(!by(&["x"], &[], &[]).matches(&mut f()));
        assert!(by(&[], &["*.example.com"], &[]).matches(&mut f()));
        assert!(by(&[], &["api.example.com"], &[]).matches(&mut f()));
        assert!(!by(&[], &["*.other.com", "example.com"], &[]).matches(&mut f()));
        assert!(by(&[], &[], &["qwen.default.svc.cluster.local"]).matches(&mut f()));
        assert!(by(&[], &[], &["qwen.default.svc.cluster.local:8080"]).matches(&mut f()));
        assert!(!by(&[], &[], &["qwen.default.svc.cluster.local:80"]).matches(&mut f()));
        assert!(!by(&["chat"], &["*.other.com"], &[]).matches(&mut f()));
        assert!(!by(&["chat"], &[], &[]).matches(&mut Facts("", "h", "c")));
    }
}
