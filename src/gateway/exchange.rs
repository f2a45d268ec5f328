//! muster's own HTTP/1.1 exchange with an upstream, for requests without
//! a body (most proxied requests): the request head goes out in one
//! write, the response head is read and framed on the request's own task,
//! and the response body is read from the connection as the client takes
//! it. The connection goes back to its pool when the body has been read to
//! its end.
//!
//! hyper's client connection does the same work through a task of its own
//! per connection, with channels to the request and to the response body.
//! Requests with a body or an upgrade still go that way (`pool.rs`): it
//! reads the response while the body is still going out.
//!
//! The response's length follows RFC 9112 §6.3: none for HEAD, 1xx, 204
//! and 304; chunked when the last transfer coding is chunked, and until
//! the upstream closes when there is a Transfer-Encoding whose last coding
//! is not (a Content-Length beside either is dropped); else the
//! Content-Length (several values must agree); else until the upstream
//! closes. Interim 1xx responses are skipped. Trailers are passed on as
//! a trailers frame, less the fields that may not be trailers. The
//! connection's own fields (`Connection` when it names no other field,
//! `Keep-Alive`, `Transfer-Encoding`, `Proxy-Connection`) are consumed
//! here, not passed on. A connection is kept only for an HTTP/1.1
//! response without `Connection: close` whose length it knew, read to the
//! end with nothing after it; an unanswered request on a kept connection
//! is [`ExchangeError::is_stale`].

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::{request, response};
use hyper::{Method, Response, StatusCode, Version};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::headers::is_hop_by_hop;
use super::proxy::BoxError;
use crate::http_server::{field_parser, parsed_field_value, write_field};

/// Most fields in a response head (hyper's limit too).
const MAX_FIELDS: usize = 100;
/// Longest response head, and longest trailer section.
const MAX_HEAD: usize = 64 * 1024;
/// Room made in the input buffer before a read, at first; a read that
/// fills it doubles it, up to [`MAX_READ_ROOM`], so a large body goes in
/// few reads.
const READ_ROOM: usize = 8 * 1024;
const MAX_READ_ROOM: usize = 256 * 1024;
/// Largest request-head buffer an idle connection keeps.
const MAX_KEPT_OUTPUT: usize = 8 * 1024;
/// Longest chunk-size line (with its extensions).
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Most trailer fields after a chunked body.
const MAX_TRAILERS: usize = 32;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("the upstream closed the connection before responding")]
    Closed,
    #[error("the connection failed before any response: {0}")]
    Lost(io::Error),
    #[error("reading the response: {0}")]
    Read(io::Error),
    #[error("the upstream closed the connection in the middle of the response")]
    Truncated,
    #[error("malformed response head: {0}")]
    Malformed(httparse::Error),
    #[error("response head over {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("invalid response: {0}")]
    Invalid(&'static str),
}

impl ExchangeError {
    /// Nothing came back: on a reused connection, the upstream had closed
    /// it, and an idempotent request may go again on another.
    pub fn is_stale(&self) -> bool {
        matches!(self, Self::Closed | Self::Lost(_))
    }
}

/// An upstream connection, with what has been read from it and not used
/// yet and the buffer its request heads are written in.
pub struct Connection {
    stream: TcpStream,
    input: BytesMut,
    /// Room to make before the next read.
    read_room: usize,
    output: Vec<u8>,
}

impl Connection {
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            input: BytesMut::new(),
            read_room: READ_ROOM,
            output: Vec::new(),
        }
    }

    /// Whether it may carry another request: nothing is left over and
    /// nothing has arrived since, as far as the reactor has heard (a
    /// close, a reset or stray bytes make it readable). No system call
    /// unless the socket is marked readable; then one read of a byte
    /// tells, and clears a stale mark.
    pub fn is_idle(&self) -> bool {
        self.input.is_empty()
            && matches!(
                self.stream.try_read(&mut [0u8; 1]),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock
            )
    }

    /// Gives back memory a large response or request left behind, before
    /// the connection waits idle.
    fn shrink(&mut self) {
        if self.input.capacity() > 2 * READ_ROOM {
            self.input = BytesMut::new();
        }
        self.read_room = READ_ROOM;
        if self.output.capacity() > MAX_KEPT_OUTPUT {
            self.output = Vec::new();
        }
    }

    /// Reads what has arrived; 0 at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.input.capacity() - self.input.len() < self.read_room / 2 {
            self.input.reserve(self.read_room);
        }
        let room = self.input.capacity() - self.input.len();
        let read = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.stream),
            cx,
            &mut self.input
        ))?;
        if read == room {
            self.read_room = (self.read_room * 2).min(MAX_READ_ROOM);
        }
        Poll::Ready(Ok(read))
    }

    async fn fill(&mut self) -> io::Result<usize> {
        poll_fn(|cx| self.poll_fill(cx)).await
    }

    async fn send_head(&mut self, request: &request::Parts) -> Result<(), ExchangeError> {
        self.output.clear();
        encode_head(&mut self.output, request);
        self.stream
            .write_all(&self.output)
            .await
            .map_err(ExchangeError::Lost)
    }

    /// Reads up to the final response head, skipping interim ones.
    async fn read_head(&mut self, method: &Method) -> Result<Head, ExchangeError> {
        let mut answered = false;
        loop {
            if let Some(head) = final_head(&mut self.input, method, &mut answered)? {
                return Ok(head);
            }
            let received = answered || !self.input.is_empty();
            match self.fill().await {
                Ok(0) if received => return Err(ExchangeError::Truncated),
                Ok(0) => return Err(ExchangeError::Closed),
                Ok(_) => {}
                Err(error) if received => return Err(ExchangeError::Read(error)),
                Err(error) => return Err(ExchangeError::Lost(error)),
            }
        }
    }
}

/// Sends `request`, which has no body, on `connection` and reads the
/// response head. The body reads on from the connection; `release` gets
/// the connection back when it may carry another request.
pub async fn exchange<R>(
    mut connection: Connection,
    request: &request::Parts,
    release: R,
) -> Result<Response<ResponseBody<R>>, ExchangeError>
where
    R: FnOnce(Connection),
{
    connection.send_head(request).await?;
    let head = connection.read_head(&request.method).await?;
    let body = ResponseBody {
        connection: Some(connection),
        framing: head.framing,
        keep_alive: head.keep_alive,
        release: Some(release),
    };
    Ok(Response::from_parts(head.parts, body))
}

/// `METHOD /path HTTP/1.1`, the fields, and the blank line. The body is
/// empty, so any `Transfer-Encoding` is left out (as hyper does).
fn encode_head(out: &mut Vec<u8>, request: &request::Parts) {
    out.extend_from_slice(request.method.as_str().as_bytes());
    out.push(b' ');
    let target = request.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &request.headers {
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        write_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Takes heads off `input` up to the final one; `None` while that is
/// incomplete. Interim (1xx) heads are dropped, and `interim` set when
/// one was; a 101 is an error, since no upgrade was asked for.
fn final_head(
    input: &mut BytesMut,
    method: &Method,
    interim: &mut bool,
) -> Result<Option<Head>, ExchangeError> {
    while let Some(head) = parse_head(input, method)? {
        if !head.parts.status.is_informational() {
            return Ok(Some(head));
        }
        if head.parts.status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(ExchangeError::Invalid("101 to a request without upgrade"));
        }
        *interim = true;
    }
    Ok(None)
}

/// Feeds `wire` to the response parser and the body's framing `read`
/// bytes at a time, as reads would deliver it, and returns how many body
/// bytes came out; `None` if the response was refused. For the fuzz
/// target (`fuzz/fuzz_targets/upstream_response.rs`), which checks that no
/// input panics, loops or yields more than it was given.
#[doc(hidden)]
pub fn feed_response(wire: &[u8], head_request: bool, read: usize) -> Option<usize> {
    feed(wire, head_request, read).ok()
}

fn feed(wire: &[u8], head_request: bool, read: usize) -> Result<usize, ExchangeError> {
    let method = if head_request {
        Method::HEAD
    } else {
        Method::GET
    };
    let mut reads = wire.chunks(read.max(1));
    let mut input = BytesMut::new();
    let mut head = loop {
        if let Some(head) = final_head(&mut input, &method, &mut false)? {
            break head;
        }
        let bytes = reads.next().ok_or(ExchangeError::Truncated)?;
        input.extend_from_slice(bytes);
    };
    let (body, _) = read_body(&mut head.framing, &mut input, reads)?;
    Ok(body.len())
}

/// The body `framing` finds in `input` and then in `reads`, as they
/// deliver it, and its trailers; what follows it stays in `input`. The
/// synchronous twin of [`ResponseBody`]'s polling, for the fuzz target and
/// tests.
fn read_body<'a>(
    framing: &mut Framing,
    input: &mut BytesMut,
    mut reads: impl Iterator<Item = &'a [u8]>,
) -> Result<(Vec<u8>, Option<HeaderMap>), ExchangeError> {
    let mut body = Vec::new();
    let mut trailers = None;
    loop {
        match framing.step(input)? {
            Step::Data(bytes) => body.extend_from_slice(&bytes),
            Step::Trailers(fields) => trailers = Some(fields),
            Step::End => return Ok((body, trailers)),
            Step::More => match reads.next() {
                Some(bytes) => input.extend_from_slice(bytes),
                None if *framing == Framing::UntilClose => return Ok((body, trailers)),
                None => return Err(ExchangeError::Truncated),
            },
        }
    }
}

/// A response head and how its body is delimited.
struct Head {
    parts: response::Parts,
    framing: Framing,
    /// The connection may carry another request after this response.
    keep_alive: bool,
}

/// Takes a complete response head off the front of `input`; `None` while
/// it is incomplete. Field values share the head's bytes.
fn parse_head(input: &mut BytesMut, method: &Method) -> Result<Option<Head>, ExchangeError> {
    if input.is_empty() {
        return Ok(None);
    }
    // Left uninitialised: filling a hundred fields per response showed up
    // in the instruction count.
    let mut fields = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_FIELDS];
    let mut parsed = httparse::Response::new(&mut []);
    let parser = field_parser();
    let length = match parser.parse_response_with_uninit_headers(&mut parsed, input, &mut fields) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) if input.len() >= MAX_HEAD => {
            return Err(ExchangeError::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(ExchangeError::Malformed(error)),
    };
    let code = parsed
        .code
        .ok_or(ExchangeError::Invalid("no status code"))?;
    let status = StatusCode::from_u16(code).map_err(|_| ExchangeError::Invalid("status code"))?;
    let version = match parsed.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    // Where each field's name and value are in the head: the values are
    // cut from it once it is split off the input. (A zeroed array of a
    // hundred would cost more than this allocation.) The fields about the
    // connection and the body's length are read on the way.
    let start = input.as_ptr() as usize;
    let span = |field: &[u8]| match field.is_empty() {
        true => (0, 0),
        false => {
            let from = field.as_ptr() as usize - start;
            debug_assert!(from + field.len() <= length, "a field outside the head");
            (from, from + field.len())
        }
    };
    let mut own = OwnFields::default();
    let mut spans = Vec::with_capacity(parsed.headers.len());
    for field in parsed.headers.iter() {
        let kind = OwnField::of(field.name);
        if let Some(kind) = kind {
            own.read(kind, field.value)?;
        }
        spans.push((span(field.name.as_bytes()), span(field.value), kind));
    }
    let head = input.split_to(length).freeze();
    // Room for the request id the proxy adds.
    let mut headers = HeaderMap::with_capacity(spans.len() + 1);
    for ((name_from, name_to), (value_from, value_to), kind) in spans {
        if kind.is_some_and(|kind| !own.passes(kind)) {
            continue;
        }
        let name = HeaderName::from_bytes(&head[name_from..name_to])
            .map_err(|_| ExchangeError::Invalid("header field name"))?;
        let value = parsed_field_value(head.slice(value_from..value_to));
        headers.append(name, value);
    }
    let (framing, length_known) = own.framing(method, status);
    let keep_alive = length_known && version == Version::HTTP_11 && !own.close;
    let mut parts = Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(Head {
        parts,
        framing,
        keep_alive,
    }))
}

/// The fields the exchange itself acts on: the body's length and the
/// connection's own fields (RFC 9110 §7.6.1), which are consumed here
/// rather than passed on (`strip_hop_by_hop` in `proxy.rs` removes what is
/// left, such as the fields a `Connection` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnField {
    ContentLength,
    TransferEncoding,
    Connection,
    KeepAlive,
    ProxyConnection,
}

impl OwnField {
    fn of(name: &str) -> Option<Self> {
        let is = |known: &str| name.eq_ignore_ascii_case(known);
        match name.len() {
            10 if is("connection") => Some(Self::Connection),
            10 if is("keep-alive") => Some(Self::KeepAlive),
            14 if is("content-length") => Some(Self::ContentLength),
            16 if is("proxy-connection") => Some(Self::ProxyConnection),
            17 if is("transfer-encoding") => Some(Self::TransferEncoding),
            _ => None,
        }
    }
}

/// What a response's own fields say.
#[derive(Debug, Default)]
struct OwnFields {
    /// The Content-Length; every value must be the same number.
    length: Option<u64>,
    /// Whether the last transfer coding is chunked, when there is one.
    chunked: Option<bool>,
    /// `Connection: close`.
    close: bool,
    /// `Connection` names other fields: it stays, for those to be removed.
    names_fields: bool,
}

impl OwnFields {
    fn read(&mut self, field: OwnField, value: &[u8]) -> Result<(), ExchangeError> {
        match field {
            OwnField::ContentLength => self.read_length(value)?,
            OwnField::TransferEncoding => {
                for coding in list(value) {
                    self.chunked = Some(coding.eq_ignore_ascii_case(b"chunked"));
                }
            }
            OwnField::Connection => {
                for option in list(value) {
                    if option.eq_ignore_ascii_case(b"close") {
                        self.close = true;
                    } else if !option.eq_ignore_ascii_case(b"keep-alive") {
                        self.names_fields = true;
                    }
                }
            }
            OwnField::KeepAlive | OwnField::ProxyConnection => {}
        }
        Ok(())
    }

    fn read_length(&mut self, value: &[u8]) -> Result<(), ExchangeError> {
        for number in value.split(|&b| b == b',') {
            let number = number.trim_ascii();
            let parsed = match number.is_empty() || !number.iter().all(u8::is_ascii_digit) {
                true => None,
                false => std::str::from_utf8(number)
                    .ok()
                    .and_then(|n| n.parse::<u64>().ok()),
            };
            match (parsed, self.length) {
                (Some(n), Some(seen)) if n == seen => {}
                (Some(n), None) => self.length = Some(n),
                _ => return Err(ExchangeError::Invalid("content-length")),
            }
        }
        Ok(())
    }

    /// Whether the field goes on with the message: a Content-Length only
    /// without a Transfer-Encoding (RFC 9112 §6.3), a `Connection` only
    /// when it names other fields.
    fn passes(&self, field: OwnField) -> bool {
        match field {
            OwnField::ContentLength => self.chunked.is_none(),
            OwnField::Connection => self.names_fields,
            OwnField::TransferEncoding | OwnField::KeepAlive | OwnField::ProxyConnection => false,
        }
    }

    /// How the body of a response to `method` with `status` is delimited,
    /// and whether its end is known without the connection closing.
    fn framing(&self, method: &Method, status: StatusCode) -> (Framing, bool) {
        if method == Method::HEAD
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return (Framing::Length(0), true);
        }
        match (self.chunked, self.length) {
            (Some(true), length) => (Framing::Chunked(Chunk::Size), length.is_none()),
            (Some(false), _) | (None, None) => (Framing::UntilClose, false),
            (None, Some(length)) => (Framing::Length(length), true),
        }
    }
}

/// The elements of a comma-separated field value, trimmed; empty ones
/// skipped.
fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|element| !element.is_empty())
}

/// Where a response body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes left; 0 once the body is over.
    Length(u64),
    Chunked(Chunk),
    /// Everything until the upstream closes.
    UntilClose,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// At the line end after a chunk's data.
    DataEnd,
    /// After the last chunk, at the trailer section.
    Trailers,
}

/// What the buffered input gives a body next.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Data(Bytes),
    /// The trailer fields after the last chunk; the body is over.
    Trailers(HeaderMap),
    /// The body is over.
    End,
    /// More input is needed.
    More,
}

impl Framing {
    fn step(&mut self, input: &mut BytesMut) -> Result<Step, ExchangeError> {
        loop {
            match self {
                Self::Length(0) => return Ok(Step::End),
                Self::Length(left) | Self::Chunked(Chunk::Data(left)) => {
                    if input.is_empty() {
                        return Ok(Step::More);
                    }
                    let taken = input
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= taken as u64;
                    if *self == Self::Chunked(Chunk::Data(0)) {
                        *self = Self::Chunked(Chunk::DataEnd);
                    }
                    return Ok(Step::Data(input.split_to(taken).freeze()));
                }
                Self::UntilClose if input.is_empty() => return Ok(Step::More),
                Self::UntilClose => return Ok(Step::Data(input.split().freeze())),
                Self::Chunked(Chunk::Size) => match chunk_size(input)? {
                    Some(0) => *self = Self::Chunked(Chunk::Trailers),
                    Some(size) => *self = Self::Chunked(Chunk::Data(size)),
                    None => return Ok(Step::More),
                },
                Self::Chunked(Chunk::DataEnd) => {
                    if input.len() < 2 {
                        return Ok(Step::More);
                    }
                    if &input[..2] != b"\r\n" {
                        return Err(ExchangeError::Invalid("chunk not followed by CRLF"));
                    }
                    input.advance(2);
                    *self = Self::Chunked(Chunk::Size);
                }
                Self::Chunked(Chunk::Trailers) => match trailers(input)? {
                    Some(fields) => {
                        *self = Self::Length(0);
                        if !fields.is_empty() {
                            return Ok(Step::Trailers(fields));
                        }
                    }
                    None => return Ok(Step::More),
                },
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Length(left) => SizeHint::with_exact(*left),
            _ => SizeHint::default(),
        }
    }
}

/// Takes a chunk-size line (extensions ignored) off `input`. Stricter
/// than httparse alone, as hyper is: the line starts with a digit, holds
/// no bare LF (in an extension) and is at most [`MAX_CHUNK_LINE`] long.
fn chunk_size(input: &mut BytesMut) -> Result<Option<u64>, ExchangeError> {
    let invalid = ExchangeError::Invalid("chunk size");
    if input.first().is_some_and(|b| !b.is_ascii_hexdigit()) {
        return Err(invalid);
    }
    match httparse::parse_chunk_size(input) {
        Ok(httparse::Status::Complete((used, _))) if used > MAX_CHUNK_LINE => Err(invalid),
        Ok(httparse::Status::Complete((used, _))) if input[..used - 2].contains(&b'\n') => {
            Err(invalid)
        }
        Ok(httparse::Status::Complete((used, size))) => {
            input.advance(used);
            Ok(Some(size))
        }
        Ok(httparse::Status::Partial) if input.len() >= MAX_CHUNK_LINE => Err(invalid),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(invalid),
    }
}

/// Takes the trailer section off the front of `input`, once it is all
/// there; its fields (most often none) are copied out, but for those that
/// may not travel as trailers (hop-by-hop and framing fields, `Host`),
/// which HTTP/2 would refuse.
fn trailers(input: &mut BytesMut) -> Result<Option<HeaderMap>, ExchangeError> {
    let invalid = || ExchangeError::Invalid("trailer section");
    let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILERS];
    let (length, fields) = match httparse::parse_headers(input, &mut fields) {
        Ok(httparse::Status::Complete(parsed)) => parsed,
        Ok(httparse::Status::Partial) if input.len() >= MAX_HEAD => return Err(invalid()),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(invalid()),
    };
    let mut map = HeaderMap::with_capacity(fields.len());
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| invalid())?;
        if !allowed_in_trailers(&name) {
            continue;
        }
        let value = HeaderValue::from_bytes(field.value).map_err(|_| invalid())?;
        map.append(name, value);
    }
    input.advance(length);
    Ok(Some(map))
}

fn allowed_in_trailers(name: &HeaderName) -> bool {
    !is_hop_by_hop(name) && name != header::CONTENT_LENGTH && name != header::HOST
}

/// A response body read from its connection as it is polled.
pub struct ResponseBody<R: FnOnce(Connection)> {
    /// Dropped (closed) on an error.
    connection: Option<Connection>,
    framing: Framing,
    keep_alive: bool,
    release: Option<R>,
}

impl<R: FnOnce(Connection)> ResponseBody<R> {
    /// Hands the connection back if the body is over and nothing else has
    /// come; otherwise it closes.
    fn release(&mut self) {
        let (Some(connection), Some(release)) = (self.connection.take(), self.release.take())
        else {
            return;
        };
        if self.keep_alive && self.framing == Framing::Length(0) && connection.input.is_empty() {
            let mut connection = connection;
            connection.shrink();
            release(connection);
        }
    }

    fn fail(&mut self, error: ExchangeError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.connection = None;
        Poll::Ready(Some(Err(error.into())))
    }
}

impl<R: FnOnce(Connection) + Unpin> HttpBody for ResponseBody<R> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(connection) = this.connection.as_mut() else {
                return Poll::Ready(None);
            };
            match this.framing.step(&mut connection.input) {
                Ok(Step::Data(bytes)) => return Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Ok(Step::Trailers(fields)) => {
                    // The body is over: the connection can go before the
                    // frame does.
                    this.release();
                    return Poll::Ready(Some(Ok(Frame::trailers(fields))));
                }
                Ok(Step::End) => {
                    this.release();
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {}
                Err(error) => return this.fail(error),
            }
            match ready!(connection.poll_fill(cx)) {
                Ok(0) if this.framing == Framing::UntilClose => {
                    this.connection = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(ExchangeError::Truncated),
                Ok(_) => {}
                Err(error) => return this.fail(ExchangeError::Read(error)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.connection.is_none() || self.framing == Framing::Length(0)
    }

    fn size_hint(&self) -> SizeHint {
        self.framing.size_hint()
    }
}

/// A body hyper never polls because it is empty is released here.
impl<R: FnOnce(Connection)> Drop for ResponseBody<R> {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::BodyExt;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    fn head(text: &str, method: &Method) -> Result<Option<Head>, ExchangeError> {
        parse_head(&mut BytesMut::from(text), method)
    }

    /// Runs `framing` over `wire` cut at `cut`, as two reads.
    fn body_of(mut framing: Framing, wire: &[u8], cut: usize) -> Result<Vec<u8>, ExchangeError> {
        let reads = [&wire[..cut], &wire[cut..]];
        let (body, _) = read_body(&mut framing, &mut BytesMut::new(), reads.into_iter())?;
        Ok(body)
    }

    #[test]
    fn a_head_is_parsed_with_its_fields_and_length() {
        let parsed = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2\r\n\r\nhello",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(parsed.parts.status, StatusCode::OK);
        assert_eq!(parsed.parts.version, Version::HTTP_11);
        assert_eq!(parsed.parts.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(parsed.framing, Framing::Length(5));
        assert!(parsed.keep_alive);
    }

    #[test]
    fn empty_values_and_names_of_any_case_are_kept() {
        let parsed = head(
            "HTTP/1.1 200 OK\r\nX-Empty:\r\nX-Blank:   \r\n\r\n",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!(parsed.parts.headers["x-empty"], "");
        assert_eq!(parsed.parts.headers["x-blank"], "");
    }

    #[test]
    fn an_incomplete_head_waits_and_a_bad_one_fails() {
        assert!(
            head("HTTP/1.1 200 OK\r\nContent-Le", &Method::GET)
                .unwrap()
                .is_none()
        );
        assert!(head("", &Method::GET).unwrap().is_none());
        assert!(matches!(
            head("HTTP/1.1 2x0 OK\r\n\r\n", &Method::GET),
            Err(ExchangeError::Malformed(_))
        ));
        let endless = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD));
        assert!(matches!(
            head(&endless, &Method::GET),
            Err(ExchangeError::HeadTooLarge)
        ));
        let crowded = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            "x: 1\r\n".repeat(MAX_FIELDS + 1)
        );
        assert!(matches!(
            head(&crowded, &Method::GET),
            Err(ExchangeError::Malformed(_))
        ));
    }

    #[test]
    fn the_length_follows_rfc_9112() {
        let framing_of = |text: &str, method: &Method| {
            let parsed = head(text, method).unwrap().unwrap();
            (parsed.framing, parsed.keep_alive, parsed.parts.headers)
        };
        let (framing, keep, _) = framing_of(
            "HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
            &Method::HEAD,
        );
        assert_eq!(
            (framing, keep),
            (Framing::Length(0), true),
            "HEAD has no body"
        );
        for status in ["204 No Content", "304 Not Modified"] {
            let text = format!("HTTP/1.1 {status}\r\ncontent-length: 9\r\n\r\n");
            assert_eq!(
                framing_of(&text, &Method::GET).0,
                Framing::Length(0),
                "{status}"
            );
        }
        let (framing, keep, headers) = framing_of(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 9\r\n\r\n",
            &Method::GET,
        );
        assert_eq!(framing, Framing::Chunked(Chunk::Size), "chunked wins");
        assert!(
            !keep,
            "a message with both is not trusted with the connection"
        );
        assert!(
            !headers.contains_key(header::CONTENT_LENGTH),
            "the length is dropped"
        );
        let (framing, keep, _) = framing_of(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            &Method::GET,
        );
        assert_eq!((framing, keep), (Framing::UntilClose, false));
        let (framing, keep, _) = framing_of("HTTP/1.1 200 OK\r\n\r\n", &Method::GET);
        assert_eq!(
            (framing, keep),
            (Framing::UntilClose, false),
            "no length: until close"
        );
        let (framing, keep, _) = framing_of(
            "HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\ncontent-length: 3\r\n\r\n",
            &Method::GET,
        );
        assert_eq!(
            (framing, keep),
            (Framing::Length(3), true),
            "repeated equal lengths"
        );
        for bad in ["3, 4", "+3", "", "0x3", "99999999999999999999999"] {
            let text = format!("HTTP/1.1 200 OK\r\ncontent-length: {bad}\r\n\r\n");
            assert!(
                matches!(
                    head(&text, &Method::GET),
                    Err(ExchangeError::Invalid("content-length"))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_connections_own_fields_are_consumed() {
        let parsed = head(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
             Proxy-Connection: x\r\nContent-Length: 0\r\nX-Other: 1\r\n\r\n",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        let names: Vec<_> = parsed.parts.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["content-length", "x-other"]);
        assert!(parsed.keep_alive);
        // Naming another field, Connection stays for strip_hop_by_hop.
        let parsed = head(
            "HTTP/1.1 200 OK\r\nConnection: close, X-Private\r\nX-Private: 1\r\n\
             Content-Length: 0\r\n\r\n",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        assert!(parsed.parts.headers.contains_key(header::CONNECTION));
        assert!(!parsed.keep_alive);
    }

    #[test]
    fn only_an_http_1_1_response_without_close_keeps_the_connection() {
        let keeps = |text: &str| head(text, &Method::GET).unwrap().unwrap().keep_alive;
        assert!(keeps(
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: keep-alive\r\n\r\n"
        ));
        assert!(!keeps(
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: Close\r\n\r\n"
        ));
        assert!(!keeps("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n"));
    }

    #[test]
    fn a_chunked_body_decodes_however_it_is_cut() {
        let wire = b"5;name=value\r\nhello\r\nA\r\n, world!!!\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for cut in 0..=wire.len() {
            let mut input = BytesMut::new();
            let mut framing = Framing::Chunked(Chunk::Size);
            let mut reads = [&wire[..cut], &wire[cut..]].into_iter();
            let (body, trailers) = read_body(&mut framing, &mut input, &mut reads).unwrap();
            assert_eq!(framing.step(&mut input).unwrap(), Step::End, "cut at {cut}");
            let trailers = trailers.expect("trailers");
            assert_eq!(trailers["x-trailer"], "1", "cut at {cut}");
            assert_eq!(body, b"hello, world!!!", "cut at {cut}");
            // Left in the buffer, or not read at all.
            let unread: Vec<u8> = reads.flatten().copied().collect();
            assert_eq!(
                [&input[..], &unread].concat(),
                b"NEXT",
                "what follows is left, cut at {cut}"
            );
        }
    }

    #[test]
    fn a_length_body_stops_at_its_length() {
        for cut in 0..=8 {
            assert_eq!(
                body_of(Framing::Length(6), b"abcdefgh", cut).unwrap(),
                b"abcdef"
            );
        }
        assert!(matches!(
            body_of(Framing::Length(9), b"abc", 1),
            Err(ExchangeError::Truncated)
        ));
    }

    #[test]
    fn bad_chunking_is_an_error() {
        for wire in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"\r\n",
            b"0\r\nbad trailer\r\n\r\n",
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
        ] {
            let result = body_of(Framing::Chunked(Chunk::Size), wire, 0);
            assert!(
                matches!(result, Err(ExchangeError::Invalid(_))),
                "{wire:?}: {result:?}"
            );
        }
        let endless = format!("5;{}", "x".repeat(MAX_CHUNK_LINE));
        let result = body_of(Framing::Chunked(Chunk::Size), endless.as_bytes(), 0);
        assert!(matches!(result, Err(ExchangeError::Invalid("chunk size"))));
    }

    /// What a test upstream does once it has given all its replies.
    #[derive(Clone, Copy, PartialEq)]
    enum Then {
        StayOpen,
        Close,
    }

    /// A loopback upstream that answers each request head on a connection
    /// with the next of `replies`, and a connection to it.
    async fn upstream(replies: &'static [&'static [u8]], then: Then) -> Connection {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            for reply in replies {
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut buffer = [0u8; 1024];
                    let n = stream.read(&mut buffer).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buffer[..n]);
                }
                let end = seen.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                seen.drain(..end);
                tokio::io::AsyncWriteExt::write_all(&mut stream, reply)
                    .await
                    .unwrap();
            }
            if then == Then::StayOpen {
                let _ = stream.read(&mut [0u8; 1]).await;
            }
        });
        Connection::new(TcpStream::connect(address).await.unwrap())
    }

    fn get(path: &str) -> request::Parts {
        let mut parts = hyper::Request::new(()).into_parts().0;
        parts.uri = path.parse().unwrap();
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_static("upstream"));
        parts
    }

    type Released = Arc<Mutex<Option<Connection>>>;

    fn keeper(released: &Released) -> impl FnOnce(Connection) + Unpin + use<> {
        let released = released.clone();
        move |connection| *released.lock().unwrap() = Some(connection)
    }

    #[tokio::test]
    async fn a_read_body_returns_its_connection_for_the_next_request() {
        let replies: &[&[u8]] = &[
            b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\none",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\n\r\n",
        ];
        let mut connection = upstream(replies, Then::StayOpen).await;
        for expected in ["one", "two"] {
            let released = Released::default();
            let response = exchange(connection, &get("/"), keeper(&released))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK, "the 103 is skipped");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, expected);
            connection = released.lock().unwrap().take().expect("released");
            assert!(connection.is_idle());
        }
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_idle() {
        let replies: &[&[u8]] = &[b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"];
        let released = Released::default();
        let connection = upstream(replies, Then::Close).await;
        let response = exchange(connection, &get("/"), keeper(&released))
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
        let connection = released.lock().unwrap().take().expect("released");
        // The reactor hears of the close; nothing reads the socket.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while connection.is_idle() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the close was never seen"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_large_body_leaves_no_large_buffer_on_the_idle_connection() {
        let mut reply = b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n".to_vec();
        reply.resize(reply.len() + 1_048_576, b'x');
        let reply: &'static [u8] = reply.leak();
        let replies: &'static [&'static [u8]] = Vec::from([reply]).leak();
        let released = Released::default();
        let connection = upstream(replies, Then::StayOpen).await;
        let response = exchange(connection, &get("/"), keeper(&released))
            .await
            .unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 1_048_576);
        let connection = released.lock().unwrap().take().expect("released");
        assert!(connection.input.capacity() <= 2 * READ_ROOM);
        assert_eq!(connection.read_room, READ_ROOM);
    }

    #[tokio::test]
    async fn a_connection_that_closes_is_not_returned() {
        let replies: &[&[u8]] =
            &[b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"];
        let released = Released::default();
        let response = exchange(
            upstream(replies, Then::StayOpen).await,
            &get("/"),
            keeper(&released),
        )
        .await
        .unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "ok");
        assert!(released.lock().unwrap().is_none());
    }

    #[tokio::test]
    async fn an_upstream_that_closes_without_answering_is_stale() {
        let released = Released::default();
        let error = exchange(
            upstream(&[], Then::Close).await,
            &get("/"),
            keeper(&released),
        )
        .await
        .err()
        .expect("no response");
        assert!(error.is_stale(), "{error}");
        let replies: &[&[u8]] = &[b"HTTP/1.1 200 OK\r\ncontent-le"];
        let error = exchange(
            upstream(replies, Then::Close).await,
            &get("/"),
            keeper(&released),
        )
        .await
        .err()
        .expect("no whole response");
        assert!(matches!(error, ExchangeError::Truncated), "{error}");
        assert!(!error.is_stale(), "part of an answer came");
    }

    /// `data` cut into chunks of `sizes` (cycled), chunked-encoded.
    fn chunked(data: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut wire = Vec::new();
        let mut rest = data;
        for &size in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, after) = rest.split_at(size.clamp(1, rest.len()));
            wire.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            wire.extend_from_slice(chunk);
            wire.extend_from_slice(b"\r\n");
            rest = after;
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        wire
    }

    #[test]
    fn trailers_that_may_not_travel_are_left_out() {
        let mut input = BytesMut::from(
            &b"connection: x\r\nx-ok: 1\r\ncontent-length: 3\r\nhost: h\r\nte: trailers\r\n\r\n"[..],
        );
        let fields = trailers(&mut input).unwrap().unwrap();
        assert_eq!(fields.len(), 1, "{fields:?}");
        assert_eq!(fields["x-ok"], "1");
        assert!(input.is_empty());
    }

    proptest::proptest! {
        #[test]
        fn any_chunking_of_any_body_decodes_to_it(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            sizes in proptest::collection::vec(1usize..300, 1..8),
            cut in 0usize..2000,
        ) {
            let wire = chunked(&data, &sizes);
            let cut = cut.min(wire.len());
            let body = body_of(Framing::Chunked(Chunk::Size), &wire, cut).unwrap();
            proptest::prop_assert_eq!(body, data);
        }

        #[test]
        fn any_bytes_after_a_status_line_fail_cleanly_or_frame(
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
            cut in 0usize..500,
        ) {
            let mut wire = b"HTTP/1.1 200 OK\r\n".to_vec();
            wire.extend_from_slice(&tail);
            let mut input = BytesMut::from(&wire[..]);
            if let Ok(Some(parsed)) = parse_head(&mut input, &Method::GET) {
                let rest = input.to_vec();
                let _ = body_of(parsed.framing, &rest, cut.min(rest.len()));
            }
        }
    }

    #[test]
    fn the_request_head_leaves_out_transfer_encoding() {
        let mut parts = get("/a?b=c");
        parts.method = Method::DELETE;
        parts.headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        let mut out = Vec::new();
        encode_head(&mut out, &parts);
        assert_eq!(out, b"DELETE /a?b=c HTTP/1.1\r\nhost: upstream\r\n\r\n");
    }
}
