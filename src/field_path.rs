//! Names the field a serde error is about, as a dotted path
//! (`dns.ttl`, `ports.http.port`), for the config file and API bodies
//! alike. `serde_path_to_error` gives the path of what was being read;
//! a missing field is named only in serde's message, so it is taken from
//! there.

/// The dotted path of the field an error at `path` with `message` is
/// about; `None` when it concerns the whole document.
pub fn field_of(path: &str, message: &str) -> Option<String> {
    let path = if path == "." || path == "?" { "" } else { path };
    let named = ["unknown field `", "missing field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split('`').next());
    match (named, path) {
        (None, "") => None,
        (None, path) => Some(path.to_string()),
        (Some(name), "") => Some(name.to_string()),
        (Some(name), path) if path == name || path.ends_with(&format!(".{name}")) => {
            Some(path.to_string())
        }
        (Some(name), path) => Some(format!("{path}.{name}")),
    }
}

#[cfg(test)]
mod tests {
    use super::field_of;

    #[test]
    fn paths_and_named_fields() {
        assert_eq!(field_of(".", "expected value"), None);
        assert_eq!(field_of("dns.ttl", "bad").as_deref(), Some("dns.ttl"));
        assert_eq!(
            field_of(".", "missing field `address`").as_deref(),
            Some("address")
        );
        assert_eq!(
            field_of("ports.x", "missing field `port`").as_deref(),
            Some("ports.x.port")
        );
        assert_eq!(
            field_of("dns.ttls", "unknown field `ttls`, expected one of").as_deref(),
            Some("dns.ttls")
        );
        assert_eq!(
            field_of("dns", "unknown field `ttls`").as_deref(),
            Some("dns.ttls")
        );
    }
}
