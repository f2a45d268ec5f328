//! The route table: which route a request takes, and how its path is
//! rewritten. Built once from the config (and again on reload) into an
//! immutable table sorted by specificity, so matching is a scan that stops
//! at the first hit and takes no lock.

use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::PathAndQuery;

use crate::config::{Balance, RouteConfig, UpstreamProtocol};
use crate::registry::validate::dns_label;

/// How a route matches the Host.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    Any,
    Exact(String),
    /// `*.example.com`, kept as `.example.com`.
    Suffix(String),
}

/// How a route changes the path before proxying.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rewrite {
    None,
    Strip(String),
    Replace { from: String, to: String },
}

/// One compiled route.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    host: HostMatch,
    path_prefix: String,
    methods: Option<Vec<Method>>,
    headers: Vec<(HeaderName, HeaderValue)>,
    pub service: Arc<str>,
    pub port: Option<String>,
    rewrite: Rewrite,
    pub host_rewrite: Option<HeaderValue>,
    pub balance: Balance,
    pub upstream: UpstreamProtocol,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub read_timeout: Duration,
    pub retries: u32,
}

/// All routes, most specific first; ties keep their order in the config.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Compiles routes that `validate_route` accepted.
    pub fn new(configs: &[RouteConfig]) -> Result<Self, (&'static str, String)> {
        let mut routes = configs
            .iter()
            .map(Route::compile)
            .collect::<Result<Vec<_>, _>>()?;
        // A stable sort keeps the config order among equally specific routes.
        routes.sort_by_key(|r| std::cmp::Reverse(r.specificity()));
        Ok(Self {
            routes: routes.into_iter().map(Arc::new).collect(),
        })
    }

    /// The route a request takes, if any, with its place in `routes()`.
    pub fn find(
        &self,
        host: Option<&str>,
        path: &str,
        method: &Method,
        headers: &HeaderMap,
    ) -> Option<(usize, &Arc<Route>)> {
        let host = host.map(host_name);
        self.routes
            .iter()
            .enumerate()
            .find(|(_, r)| r.matches(host, path, method, headers))
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }
}

impl Route {
    fn compile(config: &RouteConfig) -> Result<Self, (&'static str, String)> {
        validate_route(config)?;
        let host = match config.host.as_deref().map(str::to_ascii_lowercase) {
            None => HostMatch::Any,
            Some(host) => match host.strip_prefix('*') {
                Some(suffix) => HostMatch::Suffix(suffix.to_string()),
                None => HostMatch::Exact(host),
            },
        };
        let methods = config.methods.as_ref().map(|methods| {
            methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()).ok())
                .collect()
        });
        let headers = config
            .headers
            .iter()
            .filter_map(|(name, value)| {
                Some((
                    HeaderName::from_bytes(name.as_bytes()).ok()?,
                    HeaderValue::from_str(value).ok()?,
                ))
            })
            .collect();
        let rewrite = match (&config.strip_prefix, &config.replace_prefix) {
            (Some(prefix), _) => Rewrite::Strip(trim_slash(prefix)),
            (None, Some(replace)) => Rewrite::Replace {
                from: trim_slash(&replace.from),
                to: trim_slash(&replace.to),
            },
            (None, None) => Rewrite::None,
        };
        Ok(Self {
            name: config.name.as_str().into(),
            host,
            path_prefix: trim_slash(&config.path_prefix),
            methods,
            headers,
            service: config.service.to_ascii_lowercase().into(),
            port: config.port.as_ref().map(|p| p.to_ascii_lowercase()),
            rewrite,
            host_rewrite: config
                .host_rewrite
                .as_ref()
                .and_then(|h| HeaderValue::from_str(h).ok()),
            balance: config.balance,
            upstream: config.upstream,
            connect_timeout: config.connect_timeout,
            timeout: config.timeout,
            read_timeout: config.read_timeout,
            retries: config.retries,
        })
    }

    /// Higher is more specific: exact host over wildcard over none (a
    /// longer wildcard over a shorter), then a longer path prefix, then a
    /// method list, then more header conditions.
    fn specificity(&self) -> (u8, usize, usize, bool, usize) {
        let (host_rank, host_length) = match &self.host {
            HostMatch::Exact(host) => (2, host.len()),
            HostMatch::Suffix(suffix) => (1, suffix.len()),
            HostMatch::Any => (0, 0),
        };
        (
            host_rank,
            host_length,
            self.path_prefix.len(),
            self.methods.is_some(),
            self.headers.len(),
        )
    }

    fn matches(
        &self,
        host: Option<&str>,
        path: &str,
        method: &Method,
        headers: &HeaderMap,
    ) -> bool {
        let host_ok = match (&self.host, host) {
            (HostMatch::Any, _) => true,
            (HostMatch::Exact(want), Some(host)) => host.eq_ignore_ascii_case(want),
            (HostMatch::Suffix(suffix), Some(host)) => {
                host.len() > suffix.len()
                    && host.as_bytes()[host.len() - suffix.len()..]
                        .eq_ignore_ascii_case(suffix.as_bytes())
            }
            (_, None) => false,
        };
        host_ok
            && on_segment_boundary(path, &self.path_prefix)
            && self.methods.as_ref().is_none_or(|m| m.contains(method))
            && self
                .headers
                .iter()
                .all(|(name, value)| headers.get(name) == Some(value))
    }

    /// The upstream path and query for a request to `uri`, parsed once
    /// for every attempt; the request's own, uncopied, when the route
    /// rewrites nothing. `None` if the rewritten path is not a valid one.
    pub fn upstream_path(&self, uri: &hyper::Uri) -> Option<PathAndQuery> {
        if let (Rewrite::None, Some(original)) = (&self.rewrite, uri.path_and_query()) {
            return Some(original.clone());
        }
        let rewritten = self.rewrite(uri.path(), uri.query());
        PathAndQuery::from_maybe_shared(bytes::Bytes::from(rewritten)).ok()
    }

    /// The upstream path (and query) for `path_and_query`.
    pub fn rewrite(&self, path: &str, query: Option<&str>) -> String {
        let rewritten = match &self.rewrite {
            Rewrite::None => path.to_string(),
            Rewrite::Strip(prefix) => replace_prefix(path, prefix, ""),
            Rewrite::Replace { from, to } => replace_prefix(path, from, to),
        };
        let rewritten = if rewritten.is_empty() {
            "/".to_string()
        } else {
            rewritten
        };
        match query {
            Some(query) => format!("{rewritten}?{query}"),
            None => rewritten,
        }
    }
}

/// `prefix` ("" is the root) matches `path` whole or up to a `/`.
fn on_segment_boundary(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.is_empty(),
        None => false,
    }
}

fn replace_prefix(path: &str, from: &str, to: &str) -> String {
    if on_segment_boundary(path, from) {
        format!("{to}{}", &path[from.len()..])
    } else {
        path.to_string()
    }
}

/// A prefix without its trailing slash (`/` becomes the empty root).
fn trim_slash(prefix: &str) -> String {
    prefix.trim_end_matches('/').to_string()
}

/// The Host without its port and trailing dot (`[::1]:80` keeps its
/// brackets); borrowed, compared case-insensitively.
fn host_name(host: &str) -> &str {
    let name = if host.starts_with('[') {
        host.split_inclusive(']').next().unwrap_or(host)
    } else {
        host.split(':').next().unwrap_or(host)
    };
    name.trim_end_matches('.')
}

/// Checks a route's keys; errors name the key within the route.
pub fn validate_route(route: &RouteConfig) -> Result<(), (&'static str, String)> {
    if route.name.trim().is_empty() {
        return Err(("name", "must not be empty".into()));
    }
    if let Some(host) = &route.host {
        let labels = host.strip_prefix("*.").unwrap_or(host);
        for label in labels.trim_end_matches('.').split('.') {
            dns_label("host", label)
                .map_err(|_| ("host", format!("{host:?} is not a host name or *.domain")))?;
        }
    }
    for (key, path) in [
        ("path_prefix", Some(&route.path_prefix)),
        ("strip_prefix", route.strip_prefix.as_ref()),
        (
            "replace_prefix.from",
            route.replace_prefix.as_ref().map(|r| &r.from),
        ),
        (
            "replace_prefix.to",
            route.replace_prefix.as_ref().map(|r| &r.to),
        ),
    ] {
        if let Some(path) = path
            && !path.starts_with('/')
        {
            return Err((key, format!("{path:?} must start with /")));
        }
    }
    if route.strip_prefix.is_some() && route.replace_prefix.is_some() {
        return Err((
            "replace_prefix",
            "use strip_prefix or replace_prefix, not both".into(),
        ));
    }
    for method in route.methods.iter().flatten() {
        Method::from_bytes(method.to_ascii_uppercase().as_bytes())
            .map_err(|_| ("methods", format!("{method:?} is not an HTTP method")))?;
    }
    for (name, value) in &route.headers {
        HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ("headers", format!("{name:?} is not a header name")))?;
        HeaderValue::from_str(value).map_err(|_| {
            (
                "headers",
                format!("the value of {name:?} is not a header value"),
            )
        })?;
    }
    dns_label("service", &route.service).map_err(|e| ("service", e.message))?;
    if let Some(port) = &route.port {
        dns_label("port", port).map_err(|e| ("port", e.message))?;
    }
    if let Some(host) = &route.host_rewrite {
        HeaderValue::from_str(host)
            .map_err(|_| ("host_rewrite", format!("{host:?} is not a header value")))?;
    }
    if route.connect_timeout.is_zero() {
        return Err(("connect_timeout", "must be more than 0".into()));
    }
    if route.timeout.is_zero() {
        return Err(("timeout", "must be more than 0".into()));
    }
    if route.read_timeout.is_zero() {
        return Err(("read_timeout", "must be more than 0".into()));
    }
    if route.retries > crate::config::MAX_RETRIES {
        return Err(("retries", format!("at most {}", crate::config::MAX_RETRIES)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, extra: &str) -> RouteConfig {
        let text = format!("name = {name:?}\nservice = \"orders\"\n{extra}");
        toml::from_str(&text).unwrap()
    }

    fn table(routes: Vec<RouteConfig>) -> RouteTable {
        RouteTable::new(&routes).unwrap()
    }

    fn find<'a>(table: &'a RouteTable, host: &str, path: &str, method: &str) -> Option<&'a str> {
        table
            .find(
                Some(host),
                path,
                &Method::from_bytes(method.as_bytes()).unwrap(),
                &HeaderMap::new(),
            )
            .map(|(_, r)| &*r.name)
    }

    #[test]
    fn path_prefixes_match_on_segment_boundaries() {
        let t = table(vec![route("orders", "path_prefix = \"/api/orders/\"")]);
        assert_eq!(find(&t, "a", "/api/orders", "GET"), Some("orders"));
        assert_eq!(find(&t, "a", "/api/orders/42", "GET"), Some("orders"));
        assert_eq!(find(&t, "a", "/api/ordersx", "GET"), None);
        assert_eq!(find(&t, "a", "/api", "GET"), None);
        let root = table(vec![route("all", "")]);
        assert_eq!(find(&root, "a", "/anything/at/all", "GET"), Some("all"));
    }

    #[test]
    fn the_most_specific_route_wins_and_ties_keep_config_order() {
        let t = table(vec![
            route("catch-all", ""),
            route("api", "path_prefix = \"/api\""),
            route("orders", "path_prefix = \"/api/orders\""),
            route("wild", "host = \"*.example.com\"\npath_prefix = \"/api\""),
            route(
                "exact",
                "host = \"api.example.com\"\npath_prefix = \"/api\"",
            ),
            route("post", "path_prefix = \"/api\"\nmethods = [\"post\"]"),
            route("first", "path_prefix = \"/tie\""),
            route("second", "path_prefix = \"/tie\""),
        ]);
        assert_eq!(find(&t, "other", "/api/orders/1", "GET"), Some("orders"));
        assert_eq!(find(&t, "other", "/api/x", "GET"), Some("api"));
        assert_eq!(find(&t, "other", "/api/x", "POST"), Some("post"));
        assert_eq!(
            find(&t, "shop.example.com", "/api/orders/1", "GET"),
            Some("wild")
        );
        assert_eq!(
            find(&t, "API.example.com:8080", "/api/x", "GET"),
            Some("exact")
        );
        assert_eq!(
            find(&t, "example.com", "/api/x", "GET"),
            Some("api"),
            "a wildcard needs a label"
        );
        assert_eq!(find(&t, "other", "/tie", "GET"), Some("first"));
        assert_eq!(find(&t, "other", "/", "GET"), Some("catch-all"));
    }

    #[test]
    fn header_conditions_must_all_match() {
        let t = table(vec![route(
            "mobile",
            "headers = { \"x-client\" = \"mobile\", \"x-version\" = \"2\" }",
        )]);
        let mut headers = HeaderMap::new();
        headers.insert("x-client", HeaderValue::from_static("mobile"));
        assert!(t.find(None, "/", &Method::GET, &headers).is_none());
        headers.insert("x-version", HeaderValue::from_static("2"));
        assert!(t.find(None, "/", &Method::GET, &headers).is_some());
    }

    #[test]
    fn rewrites_strip_or_replace_the_prefix() {
        let strip = Route::compile(&route("s", "strip_prefix = \"/api\"")).unwrap();
        assert_eq!(
            strip.rewrite("/api/orders/42", Some("a=1")),
            "/orders/42?a=1"
        );
        assert_eq!(strip.rewrite("/api", None), "/");
        assert_eq!(strip.rewrite("/apix/y", None), "/apix/y");
        let replace = Route::compile(&route(
            "r",
            "replace_prefix = { from = \"/api\", to = \"/v2\" }",
        ))
        .unwrap();
        assert_eq!(replace.rewrite("/api/orders", None), "/v2/orders");
        let keep = Route::compile(&route("k", "")).unwrap();
        assert_eq!(keep.rewrite("/a/b", None), "/a/b");
    }

    #[test]
    fn the_upstream_path_is_the_requests_own_unless_rewritten() {
        let uri: hyper::Uri = "/api/orders/42?a=1".parse().unwrap();
        let keep = Route::compile(&route("k", "")).unwrap();
        let kept = keep.upstream_path(&uri).unwrap();
        assert_eq!(kept.as_str(), "/api/orders/42?a=1");
        // Shared, not copied: the very bytes of the request's URI.
        assert_eq!(
            kept.as_str().as_ptr(),
            uri.path_and_query().unwrap().as_str().as_ptr()
        );
        let strip = Route::compile(&route("s", "strip_prefix = \"/api\"")).unwrap();
        assert_eq!(
            strip.upstream_path(&uri).unwrap().as_str(),
            "/orders/42?a=1"
        );
    }

    #[test]
    fn invalid_routes_name_their_key() {
        let key = |extra: &str| validate_route(&route("r", extra)).unwrap_err().0;
        assert_eq!(key("path_prefix = \"api\""), "path_prefix");
        assert_eq!(key("host = \"*.*.com\""), "host");
        assert_eq!(key("methods = [\"GE T\"]"), "methods");
        assert_eq!(key("port = \"_http\""), "port");
        assert_eq!(key("retries = 11"), "retries");
        assert_eq!(key("timeout = \"0s\""), "timeout");
        assert_eq!(key("read_timeout = \"0s\""), "read_timeout");
        assert_eq!(
            key("strip_prefix = \"/a\"\nreplace_prefix = { from = \"/a\", to = \"/b\" }"),
            "replace_prefix"
        );
    }
}
