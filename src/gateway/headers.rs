//! Header hygiene between clients and upstreams: hop-by-hop fields
//! (RFC 9110 §7.6.1), `X-Forwarded-*` and `Forwarded` (RFC 7239), request
//! ids and W3C `traceparent`.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
/// Longest client request id kept.
const MAX_REQUEST_ID: usize = 128;

/// The comma-separated tokens of every `name` field, trimmed.
pub fn tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Removes hop-by-hop fields: those named in `Connection`, and the
/// standard ones. `te: trailers` survives (it asks for trailers end to
/// end); with `upgrade`, `Connection: upgrade` and `Upgrade` survive too.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // The standard names present, found in one pass: at most seven, so no
    // allocation, and nothing more to do for most messages.
    let mut present: [Option<HeaderName>; HOP_BY_HOP.len()] = Default::default();
    for (slot, name) in present
        .iter_mut()
        .zip(headers.keys().filter(|n| is_hop_by_hop(n)))
    {
        *slot = Some(name.clone());
    }
    if present[0].is_none() && !upgrade {
        return;
    }
    let has = |name: &HeaderName| present.iter().flatten().any(|p| p == name);
    let trailers =
        has(&header::TE) && tokens(headers, header::TE).any(|t| t.eq_ignore_ascii_case("trailers"));
    // Fields `Connection` names besides the standard ones (`close` names
    // none); collecting none allocates nothing.
    let listed: Vec<HeaderName> = match has(&header::CONNECTION) {
        true => tokens(headers, header::CONNECTION)
            .filter(|t| !t.eq_ignore_ascii_case("close") && !is_hop_by_hop_name(t))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect(),
        false => Vec::new(),
    };
    let kept_for_upgrade =
        |name: &HeaderName| upgrade && (name == header::CONNECTION || name == header::UPGRADE);
    let standard = present
        .into_iter()
        .flatten()
        .filter(|n| !kept_for_upgrade(n));
    for name in listed.into_iter().chain(standard) {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// A field that never crosses a proxy (or names those that must not).
/// Field names are lowercase, so they match exactly.
pub(super) fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// [`is_hop_by_hop`] for a name in any letter case.
fn is_hop_by_hop_name(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|hop| hop.eq_ignore_ascii_case(name))
}

/// The standard hop-by-hop fields, lowercase.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "trailer",
];

/// A client connection's address, with the header values it yields
/// worked out once per connection rather than per request.
pub struct Peer {
    pub ip: IpAddr,
    /// The address as `X-Forwarded-For` carries it.
    address: HeaderValue,
    /// `for=…;proto=http`, the start of its `Forwarded` element.
    forwarded: String,
}

impl Peer {
    pub fn new(ip: IpAddr) -> Self {
        let node = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        let address =
            HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        Self {
            ip,
            address,
            forwarded: format!("for={node};proto=http"),
        }
    }
}

/// Sets `X-Forwarded-For/Proto/Host` and `Forwarded` for a request from
/// `peer`. A trusted peer's own values are extended; anyone else's are
/// replaced, so clients cannot spoof their address.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: &Peer,
    trusted: bool,
    host: Option<&HeaderValue>,
) {
    let element = forwarded_element(peer, host);
    if trusted {
        let address = peer.address.to_str().unwrap_or("unknown");
        extend(headers, X_FORWARDED_FOR, address);
        if let Some(element) = element.as_ref().and_then(|e| e.to_str().ok()) {
            extend(headers, FORWARDED, element);
        }
    } else {
        headers.insert(X_FORWARDED_FOR, peer.address.clone());
        if let Some(element) = element {
            headers.insert(FORWARDED, element);
        }
    }
    if !(trusted && headers.contains_key(X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    if !(trusted && headers.contains_key(X_FORWARDED_HOST)) {
        match host {
            Some(host) => {
                headers.insert(X_FORWARDED_HOST, host.clone());
            }
            None => {
                headers.remove(X_FORWARDED_HOST);
            }
        }
    }
}

/// This hop's `Forwarded` element: `for=…;proto=http`, and `;host="…"`
/// when the request named a host. Built in one buffer that becomes the
/// value without a copy.
fn forwarded_element(peer: &Peer, host: Option<&HeaderValue>) -> Option<HeaderValue> {
    let host = host.and_then(|h| h.to_str().ok());
    let mut element = Vec::with_capacity(peer.forwarded.len() + host.map_or(0, |h| h.len() + 8));
    element.extend_from_slice(peer.forwarded.as_bytes());
    if let Some(host) = host {
        element.extend_from_slice(b";host=\"");
        element.extend_from_slice(host.as_bytes());
        element.push(b'"');
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from(element)).ok()
}

/// Appends `value` to a trusted peer's chain in `name`.
fn extend(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    let joined = headers
        .get_all(&name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .chain(std::iter::once(value))
        .collect::<Vec<_>>()
        .join(", ");
    if let Ok(value) = HeaderValue::from_str(&joined) {
        headers.insert(name, value);
    }
}

/// Identifiers for requests and trace spans: a counter through a keyed
/// hash (SipHash with a per-process random key), so ids do not repeat in
/// practice and cannot be predicted from the ones a client has seen.
pub struct Ids {
    key: RandomState,
    counter: AtomicU64,
}

impl Default for Ids {
    fn default() -> Self {
        Self {
            key: RandomState::new(),
            counter: AtomicU64::new(0),
        }
    }
}

/// 32 lowercase hex digits, as a trace id and a generated request id are.
type Hex128 = [u8; 32];

impl Ids {
    fn next_u64(&self) -> u64 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        // A zero id is invalid in traceparent; never produce one.
        self.key.hash_one(n).max(1)
    }

    fn hex128(&self) -> Hex128 {
        let mut digits = [0; 32];
        write_hex(&mut digits[..16], self.next_u64());
        write_hex(&mut digits[16..], self.next_u64());
        digits
    }

    /// The client's `X-Request-Id` if well-formed (1–128 of
    /// `A-Z a-z 0-9 - _ . :`), otherwise a new one.
    pub fn request_id(&self, headers: &HeaderMap) -> HeaderValue {
        let given = headers.get(REQUEST_ID).filter(|v| {
            let bytes = v.as_bytes();
            !bytes.is_empty()
                && bytes.len() <= MAX_REQUEST_ID
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
        });
        match given {
            Some(value) => value.clone(),
            None => hex_value(&self.hex128()),
        }
    }

    /// The `traceparent` to send upstream: the client's trace continued
    /// with a new span id for this hop, or a new trace. A new trace's id
    /// is `request_id` when that is 32 lowercase hex digits (as generated
    /// ones are) and not all zero, so access lines and traces share a key.
    pub fn traceparent(&self, headers: &HeaderMap, request_id: &HeaderValue) -> HeaderValue {
        let continued = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent);
        // `00-` trace `-` span `-` flags
        let mut value = *b"00-________________________________-________________-__";
        match continued {
            Some((trace, flags)) => {
                value[3..35].copy_from_slice(trace.as_bytes());
                value[53..].copy_from_slice(flags.as_bytes());
            }
            None => {
                match as_trace_id(request_id) {
                    Some(id) => value[3..35].copy_from_slice(id),
                    None => value[3..35].copy_from_slice(&self.hex128()),
                }
                value[53..].copy_from_slice(b"01");
            }
        }
        write_hex(&mut value[36..52], self.next_u64());
        hex_value(&value)
    }
}

/// `id` when it can serve as a trace id: 32 lowercase hex digits, not all
/// zero.
fn as_trace_id(id: &HeaderValue) -> Option<&[u8]> {
    let bytes = id.as_bytes();
    is_trace_field(bytes, 32).then_some(bytes)
}

/// Whether `field` is a valid traceparent id of `len` digits: lowercase
/// hex, not all zero.
fn is_trace_field(field: &[u8], len: usize) -> bool {
    field.len() == len
        && field
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        && field.iter().any(|&b| b != b'0')
}

/// `n` as 16 lowercase hex digits into `out`.
fn write_hex(out: &mut [u8], n: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, digit) in out.iter_mut().enumerate().take(16) {
        *digit = DIGITS[(n >> (60 - 4 * i) & 0xf) as usize];
    }
}

/// A header value from bytes known to be visible ASCII.
fn hex_value(bytes: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(bytes).unwrap_or(HeaderValue::from_static("0"))
}

/// (trace id, flags) of a valid version-00 `traceparent`.
fn parse_traceparent(value: &str) -> Option<(&str, &str)> {
    let mut parts = value.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    (version == "00"
        && parts.next().is_none()
        && is_trace_field(trace.as_bytes(), 32)
        && is_trace_field(parent.as_bytes(), 16)
        && flags.len() == 2)
        .then_some((trace, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn hop_by_hop_fields_go_and_te_trailers_stays() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers, deflate"),
            ("transfer-encoding", "chunked"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "websocket"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-kept"]);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn a_keep_alive_response_loses_only_its_connection_fields() {
        let mut h = headers(&[
            ("content-type", "text/plain"),
            ("connection", "keep-alive, Close"),
            ("content-length", "2"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "content-type"]);
        let mut untouched = headers(&[("x-a", "1"), ("x-b", "2")]);
        strip_hop_by_hop(&mut untouched, false);
        assert_eq!(untouched.len(), 2);
    }

    #[test]
    fn a_lone_connection_field_still_removes_the_fields_it_names() {
        let mut h = headers(&[
            ("connection", "keep-alive"),
            ("connection", "X-Secret"),
            ("x-secret", "1"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn te_trailers_survives_being_named_in_connection() {
        let mut h = headers(&[("connection", "TE"), ("te", "trailers")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn upgrades_keep_their_upgrade_headers() {
        let mut h = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn spoofed_forwarding_headers_are_replaced_unless_the_peer_is_trusted() {
        let spoofed = [
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil"),
            ("forwarded", "for=6.6.6.6"),
        ];
        let host = HeaderValue::from_static("api.example.com");
        let mut h = headers(&spoofed);
        set_forwarded(
            &mut h,
            &Peer::new("10.0.0.9".parse().unwrap()),
            false,
            Some(&host),
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example.com");
        assert_eq!(
            h["forwarded"],
            "for=10.0.0.9;proto=http;host=\"api.example.com\""
        );
        let mut h = headers(&spoofed);
        set_forwarded(
            &mut h,
            &Peer::new("::1".parse().unwrap()),
            true,
            Some(&host),
        );
        assert_eq!(h["x-forwarded-for"], "6.6.6.6, ::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert!(
            h["forwarded"]
                .to_str()
                .unwrap()
                .starts_with("for=6.6.6.6, for=\"[::1]\"")
        );
    }

    #[test]
    fn request_ids_are_kept_when_well_formed() {
        let ids = Ids::default();
        assert_eq!(
            ids.request_id(&headers(&[("x-request-id", "abc-123")])),
            "abc-123"
        );
        let fresh = ids.request_id(&headers(&[("x-request-id", "bad id!")]));
        assert_eq!(fresh.len(), 32);
        assert_ne!(ids.request_id(&HeaderMap::new()), fresh, "ids differ");
    }

    #[test]
    fn traceparent_is_continued_or_started() {
        let ids = Ids::default();
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let request_id = ids.request_id(&HeaderMap::new());
        let next = ids.traceparent(&headers(&[("traceparent", incoming)]), &request_id);
        let next = next.to_str().unwrap();
        assert!(next.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(next.ends_with("-01"));
        assert_ne!(next, incoming, "a new span id for this hop");
        let started = ids.traceparent(&headers(&[("traceparent", "garbage")]), &request_id);
        let started = started.to_str().unwrap();
        assert!(parse_traceparent(started).is_some());
        assert_eq!(
            &started[3..35],
            request_id.to_str().unwrap(),
            "a new trace takes the generated request id"
        );
        for unfit in [
            "order-17",
            "00000000000000000000000000000000",
            "4BF92F3577B34DA6A3CE929D0E0E4736",
        ] {
            let given = HeaderValue::from_static(unfit);
            let started = ids.traceparent(&HeaderMap::new(), &given);
            let started = started.to_str().unwrap();
            assert!(parse_traceparent(started).is_some(), "{started}");
            assert_ne!(
                &started[3..35],
                unfit,
                "a fresh trace id instead of {unfit}"
            );
        }
        assert!(
            parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none()
        );
    }
}
