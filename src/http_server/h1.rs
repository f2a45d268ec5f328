//! muster's own HTTP/1.1 server for plain requests: an HTTP/1.1 request
//! with no body (no `Content-Length` but `0`, no `Transfer-Encoding`), no
//! upgrade and no `Expect`, in origin form. It parses the head with
//! httparse, calls the connection's service, and writes the response on
//! the connection's own task, keeping the connection for the next request.
//!
//! Everything else (an HTTP/1.0 client, a request with a body, an
//! upgrade, `CONNECT`, a head httparse refuses or that is too large) is
//! handed to hyper's HTTP/1 server together with the bytes already read
//! ([`Prefixed`]), and hyper serves the connection from there on, so
//! hyper's answers (400, 431, upgrades, bodies) stay the protocol surface
//! for all of it. (h2c connections go to hyper from their first bytes.)
//! It owns no routing and must never answer a request it has not fully
//! understood.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Body;
use hyper::header::{self, HeaderMap, HeaderName};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// The request body of every request served here: always empty.
pub type PlainBody = Full<Bytes>;

/// hyper's own limit on a request's fields; a head with more goes to hyper,
/// which answers 431.
const MAX_FIELDS: usize = 100;
/// A head not complete within this many bytes goes to hyper.
const MAX_HEAD: usize = 64 * 1024;
/// Read at least this much room at a time.
const READ_ROOM: usize = 4096;
/// Response bytes gathered before they are written.
const WRITE_BATCH: usize = 64 * 1024;
/// Fields a handler may add to a request without its map growing (the
/// gateway adds six).
const FIELD_ROOM: usize = 8;

/// A connection's stream with the bytes already read from it in front,
/// as hyper gets it when this server hands a connection over.
pub struct Prefixed {
    prefix: Bytes,
    stream: TcpStream,
}

impl Prefixed {
    pub fn new(stream: TcpStream, prefix: Bytes) -> Self {
        Self { prefix, stream }
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.stream).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

use super::{BoxError, Handler, field_parser, parsed_field_value, write_field};

/// Serves plain requests on `stream` until the connection ends (`None`)
/// or a request this server does not take arrives: then the stream goes
/// back with everything read but not yet served, for hyper.
/// `header_read_timeout` bounds each wait for a request head, idle time
/// included; on `shutdown` an idle connection is closed, and one in the
/// middle of a request is closed after its response (a request handed
/// to hyper after shutdown began is answered by hyper, then closed).
pub async fn serve<H: Handler>(
    stream: TcpStream,
    handler: &H,
    header_read_timeout: Duration,
    shutdown: &CancellationToken,
) -> Option<Prefixed> {
    let mut connection = Connection {
        stream,
        heads: Heads::new(),
        output: Vec::with_capacity(2 * READ_ROOM),
        head_timer: Box::pin(tokio::time::sleep(header_read_timeout)),
    };
    // Waited on between requests; one future for the connection's life,
    // not one registered with the token per request.
    let mut stopping = pin!(shutdown.clone().cancelled_owned());
    loop {
        let deadline = Instant::now() + header_read_timeout;
        let plain = match connection.next_head(deadline, stopping.as_mut()).await {
            Ok(plain) => plain,
            Err(NoPlain::Other) => return Some(connection.hand_over()),
            Err(NoPlain::Gone) => return None,
        };
        let Plain {
            request,
            head_only,
            close,
        } = plain;
        let response = tokio::select! {
            biased;
            response = handler.handle(request) => response,
            () = connection.client_gone() => return None,
        };
        let close = close || shutdown.is_cancelled();
        let kept = connection.respond(response, head_only, close).await;
        if !kept.unwrap_or(false) {
            return connection.close().await;
        }
    }
}

/// Why no plain request came next on a connection.
enum NoPlain {
    /// A request not for this server: hyper takes the connection.
    Other,
    /// Closed, failed, timed out or shut down.
    Gone,
}

/// A request this server serves.
struct Plain {
    request: Request<PlainBody>,
    /// A HEAD request: the response has no body.
    head_only: bool,
    /// The client asked to close the connection after this response.
    close: bool,
}

struct Connection {
    stream: TcpStream,
    heads: Heads,
    /// The response being written.
    output: Vec<u8>,
    /// Bounds the wait for a head. It is armed once and moved on only when
    /// it fires before the current head's deadline, rather than armed
    /// anew for every request (which cost about 600 instructions each).
    head_timer: Pin<Box<Sleep>>,
}

impl Connection {
    /// Reads until a whole request head is in, and takes it.
    async fn next_head(
        &mut self,
        deadline: Instant,
        mut stopping: Pin<&mut WaitForCancellationFutureOwned>,
    ) -> Result<Plain, NoPlain> {
        loop {
            if !self.heads.input.is_empty() {
                match self.heads.parse() {
                    Ok(Some(plain)) => return Ok(plain),
                    Ok(None) if self.heads.input.len() < MAX_HEAD => {}
                    Ok(None) | Err(Other) => return Err(NoPlain::Other),
                }
            }
            let idle = self.heads.input.is_empty();
            self.heads.input.reserve(READ_ROOM);
            tokio::select! {
                read = self.stream.read_buf(&mut self.heads.input) => match read {
                    Ok(0) | Err(_) => return Err(NoPlain::Gone),
                    Ok(_) => {}
                },
                () = self.head_timer.as_mut() => {
                    if Instant::now() >= deadline {
                        return Err(NoPlain::Gone);
                    }
                    self.head_timer.as_mut().reset(deadline);
                }
                () = stopping.as_mut(), if idle => return Err(NoPlain::Gone),
            }
        }
    }

    /// Resolves when the client closes its side, or the connection fails,
    /// while its request is being served. Bytes the client sends meanwhile
    /// (the next requests, pipelined) are kept, up to `MAX_HEAD`.
    async fn client_gone(&mut self) {
        loop {
            if self.heads.input.len() >= MAX_HEAD || self.stream.readable().await.is_err() {
                return std::future::pending().await;
            }
            self.heads.input.reserve(READ_ROOM);
            match self.stream.try_read_buf(&mut self.heads.input) {
                // A client that sent more requests and then closed its
                // side still waits for their answers (as hyper has it).
                Ok(0) if !self.heads.input.is_empty() => return std::future::pending().await,
                Ok(0) => return,
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }

    /// Writes `response`; whether the connection can carry another
    /// request.
    async fn respond<B>(
        &mut self,
        response: Response<B>,
        head_only: bool,
        close: bool,
    ) -> io::Result<bool>
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = response.into_parts();
        let body = pin!(body);
        let framing = write_head(&mut self.output, &parts, &*body, head_only, close);
        let written = match framing {
            Framing::Empty { close } => self.flush().await.map(|()| !close),
            Framing::Length { length, close } => self
                .write_length(body, length)
                .await
                .map(|whole| whole && !close),
            Framing::Chunked { close } => self.write_chunked(body).await.map(|ok| ok && !close),
        };
        if written.is_err() {
            // A body that failed midway: what came of it goes out (the
            // client sees the response cut short), then the connection ends.
            let _ = self.flush().await;
        }
        if self.output.capacity() > WRITE_BATCH {
            self.output = Vec::with_capacity(2 * READ_ROOM);
        }
        written
    }

    /// Writes a body of `length` bytes; false if it had more or fewer.
    async fn write_length<B>(&mut self, mut body: Pin<&mut B>, length: u64) -> io::Result<bool>
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        let mut left = length;
        loop {
            let Some(frame) = self.next_frame(body.as_mut()).await? else {
                self.flush().await?;
                return Ok(left == 0);
            };
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            let size = data.remaining() as u64;
            let too_long = size > left;
            let mut take = size.min(left) as usize;
            left -= take as u64;
            while take > 0 {
                let chunk = data.chunk();
                let n = chunk.len().min(take);
                self.put(&chunk[..n]).await?;
                data.advance(n);
                take -= n;
            }
            if too_long {
                self.flush().await?;
                return Ok(false);
            }
        }
    }

    /// Writes a body in chunks, one per data frame; trailers are not sent
    /// (an HTTP/1 response announces none).
    async fn write_chunked<B>(&mut self, mut body: Pin<&mut B>) -> io::Result<bool>
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        loop {
            let Some(frame) = self.next_frame(body.as_mut()).await? else {
                self.output.extend_from_slice(b"0\r\n\r\n");
                self.flush().await?;
                return Ok(true);
            };
            let Ok(mut data) = frame.into_data() else {
                continue;
            };
            if !data.has_remaining() {
                continue;
            }
            let mut size_line = [0u8; 18];
            self.output
                .extend_from_slice(chunk_size_line(&mut size_line, data.remaining()));
            while data.has_remaining() {
                let chunk = data.chunk();
                let n = chunk.len();
                self.put(chunk).await?;
                data.advance(n);
            }
            self.output.extend_from_slice(b"\r\n");
        }
    }

    /// The body's next frame: taken at once when it is ready, otherwise
    /// after writing out what is gathered. An error from the body is an
    /// error here: the response cannot be finished.
    async fn next_frame<B>(
        &mut self,
        mut body: Pin<&mut B>,
    ) -> io::Result<Option<hyper::body::Frame<B::Data>>>
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        let ready = poll_fn(|cx| match body.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(Some(frame.transpose().map_err(body_error))),
            Poll::Pending => Poll::Ready(None),
        })
        .await;
        match ready {
            Some(frame) => frame,
            None => {
                self.flush().await?;
                body.frame().await.transpose().map_err(body_error)
            }
        }
    }

    /// Adds `data` to the output, writing large pieces straight out.
    async fn put(&mut self, data: &[u8]) -> io::Result<()> {
        if self.output.len() + data.len() <= WRITE_BATCH {
            self.output.extend_from_slice(data);
            return Ok(());
        }
        self.flush().await?;
        if data.len() >= WRITE_BATCH {
            return self.stream.write_all(data).await;
        }
        self.output.extend_from_slice(data);
        Ok(())
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.output.is_empty() {
            self.stream.write_all(&self.output).await?;
            self.output.clear();
        }
        Ok(())
    }

    /// Ends the connection (a FIN, as hyper sends).
    async fn close(mut self) -> Option<Prefixed> {
        let _ = self.stream.shutdown().await;
        None
    }

    fn hand_over(self) -> Prefixed {
        Prefixed::new(self.stream, self.heads.input.freeze())
    }
}

/// The request heads read from a connection and not yet served.
struct Heads {
    /// Read and not yet served.
    input: BytesMut,
    /// Where each field of the head being parsed sits in it (kept for the
    /// next request: no allocation per request).
    spans: Vec<(HeaderName, usize, usize)>,
}

impl Heads {
    fn new() -> Self {
        Self {
            input: BytesMut::with_capacity(2 * READ_ROOM),
            spans: Vec::new(),
        }
    }

    /// Parses the head at the front of the input, taking it off when
    /// complete; `None` while it is not.
    fn parse(&mut self) -> Result<Option<Plain>, Other> {
        let mut fields = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_FIELDS];
        let mut parsed = httparse::Request::new(&mut []);
        let parser = field_parser();
        let length =
            match parser.parse_request_with_uninit_headers(&mut parsed, &self.input, &mut fields) {
                Ok(httparse::Status::Complete(length)) => length,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(_) => return Err(Other),
            };
        let (Some(1), Some(method), Some(target)) = (parsed.version, parsed.method, parsed.path)
        else {
            return Err(Other);
        };
        let Ok(method) = Method::from_bytes(method.as_bytes()) else {
            return Err(Other);
        };
        if method == Method::CONNECT || !target.starts_with('/') {
            return Err(Other);
        }
        let start = self.input.as_ptr() as usize;
        let span = |field: &[u8]| {
            let from = field.as_ptr() as usize - start;
            (from, from + field.len())
        };
        let target = span(target.as_bytes());
        let (mut close, mut zero_length) = (false, false);
        self.spans.clear();
        for field in parsed.headers.iter() {
            let Ok(name) = HeaderName::from_bytes(field.name.as_bytes()) else {
                return Err(Other);
            };
            match Role::of(&name, field.value) {
                // One `Content-Length: 0`; hyper folds repeated ones.
                Role::Plain if name == header::CONTENT_LENGTH => {
                    if std::mem::replace(&mut zero_length, true) {
                        return Err(Other);
                    }
                }
                Role::Plain => {}
                Role::Close => close = true,
                Role::NotPlain => return Err(Other),
            }
            let (from, to) = if field.value.is_empty() {
                (0, 0)
            } else {
                span(field.value)
            };
            self.spans.push((name, from, to));
        }
        let head = self.input.split_to(length).freeze();
        let Some(request) = self.request(method, &head, target) else {
            // The head is off the input: hyper must see it again.
            let mut whole = BytesMut::with_capacity(head.len() + self.input.len());
            whole.extend_from_slice(&head);
            whole.extend_from_slice(&self.input);
            self.input = whole;
            return Err(Other);
        };
        let head_only = request.method() == Method::HEAD;
        Ok(Some(Plain {
            request,
            head_only,
            close,
        }))
    }

    /// The request whose head is `head`; `None` if its target is not one
    /// `http` takes.
    fn request(
        &mut self,
        method: Method,
        head: &Bytes,
        target: (usize, usize),
    ) -> Option<Request<PlainBody>> {
        let uri = Uri::from_maybe_shared(head.slice(target.0..target.1)).ok()?;
        let mut headers = HeaderMap::with_capacity(self.spans.len() + FIELD_ROOM);
        for (name, from, to) in self.spans.drain(..) {
            headers.append(name, parsed_field_value(head.slice(from..to)));
        }
        let mut request = Request::new(Full::new(Bytes::new()));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = headers;
        Some(request)
    }
}

/// Fuzzing entry: takes request heads off `data` as this server does,
/// checking that each one taken leaves the rest as it was and that one it
/// does not take is left whole, for hyper. How many were taken.
#[doc(hidden)]
pub fn feed_requests(data: &[u8]) -> usize {
    let mut heads = Heads::new();
    heads.input.extend_from_slice(data);
    let mut taken = 0;
    loop {
        let before = heads.input.clone();
        match heads.parse() {
            Ok(Some(plain)) => {
                let rest = &before[before.len() - heads.input.len()..];
                assert!(heads.input.len() < before.len(), "a head of no bytes");
                assert_eq!(rest, &heads.input[..], "the bytes after a head changed");
                assert!(plain.request.uri().path().starts_with('/'));
                taken += 1;
            }
            Ok(None) => return taken,
            Err(Other) => {
                assert_eq!(heads.input, before, "bytes lost on the way to hyper");
                return taken;
            }
        }
    }
}

fn body_error<E: Into<BoxError>>(error: E) -> io::Error {
    io::Error::other(error.into())
}

/// A request head not for this server.
struct Other;

/// What a request field means to this server.
enum Role {
    Plain,
    /// `Connection: close`.
    Close,
    /// The request is not one this server takes.
    NotPlain,
}

impl Role {
    fn of(name: &HeaderName, value: &[u8]) -> Self {
        match *name {
            header::CONTENT_LENGTH if value == b"0" => Self::Plain,
            header::CONTENT_LENGTH
            | header::TRANSFER_ENCODING
            | header::UPGRADE
            | header::EXPECT => Self::NotPlain,
            header::CONNECTION => {
                let close = value
                    .split(|&b| b == b',')
                    .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
                if close { Self::Close } else { Self::Plain }
            }
            _ => Self::Plain,
        }
    }

    fn is_close(&self) -> bool {
        matches!(self, Self::Close)
    }
}

/// How a response's body goes out, and whether the connection closes
/// after it.
enum Framing {
    /// No body at all (HEAD, 1xx, 204, 304).
    Empty {
        close: bool,
    },
    Length {
        length: u64,
        close: bool,
    },
    Chunked {
        close: bool,
    },
}

/// Writes the status line and fields of a response to a request that was
/// (`head_only`) or was not a HEAD, as hyper would: its `Date` when it has
/// none, its length from `Content-Length` or the body's exact size, else
/// chunked; no `Transfer-Encoding` or `Trailer` of its own.
fn write_head<B: Body>(
    out: &mut Vec<u8>,
    parts: &hyper::http::response::Parts,
    body: &B,
    head_only: bool,
    mut close: bool,
) -> Framing {
    let status = parts.status;
    if status.is_informational() {
        // As hyper has it: a handler cannot answer with an interim
        // response; the client gets a 500 and the connection ends.
        write_status_line(out, StatusCode::INTERNAL_SERVER_ERROR);
        write_length_field(out, 0);
        write_field(out, b"date", &http_date());
        write_field(out, b"connection", b"close");
        out.extend_from_slice(b"\r\n");
        return Framing::Empty { close: true };
    }
    write_status_line(out, status);
    let no_body = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let mut declared: Option<u64> = None;
    let mut dated = false;
    let mut said_close = false;
    for (name, value) in &parts.headers {
        match *name {
            header::CONTENT_LENGTH => {
                let parsed = value.to_str().ok().and_then(|v| v.parse::<u64>().ok());
                match (parsed, declared) {
                    (Some(length), None) => declared = Some(length),
                    (Some(length), Some(first)) if length == first => {}
                    // Disagreeing or unreadable: the first readable value
                    // (else the body's own size) frames the body, and the
                    // connection is closed after it.
                    _ => close = true,
                }
                continue;
            }
            // The framing is this server's own (chunked when the length is
            // unknown): a handler's codings are not passed on, nor a
            // `Trailer` announcing trailers an HTTP/1 response never gets.
            header::TRANSFER_ENCODING | header::TRAILER => continue,
            header::CONNECTION if Role::of(name, value.as_bytes()).is_close() => {
                close = true;
                said_close = true;
            }
            header::DATE => dated = true,
            _ => {}
        }
        write_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let exact = body.size_hint().exact();
    // An empty body is sent as one, whatever length was declared (except
    // to a HEAD request, where the declared length is the point).
    let declared = declared.filter(|_| head_only || !body.is_end_stream());
    let framing = if no_body {
        Framing::Empty { close }
    } else if head_only {
        // The length a GET would have, when it is known.
        let length = declared.or(exact.filter(|&n| n > 0 && !body.is_end_stream()));
        if let Some(length) = length {
            write_length_field(out, length);
        }
        Framing::Empty { close }
    } else if let Some(length) = declared.or(exact) {
        write_length_field(out, length);
        Framing::Length { length, close }
    } else {
        write_field(out, b"transfer-encoding", b"chunked");
        Framing::Chunked { close }
    };
    if !dated {
        write_field(out, b"date", &http_date());
    }
    if close && !said_close {
        write_field(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    framing
}

fn write_status_line(out: &mut Vec<u8>, status: StatusCode) {
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        return;
    }
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    // A reason must be written: many parsers expect one.
    let reason = status.canonical_reason().unwrap_or("<none>");
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn write_length_field(out: &mut Vec<u8>, length: u64) {
    write_field(
        out,
        b"content-length",
        itoa::Buffer::new().format(length).as_bytes(),
    );
}

/// `{size in hex}\r\n` in `room`.
fn chunk_size_line(room: &mut [u8; 18], size: usize) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (usize::BITS - size.leading_zeros()).div_ceil(4).max(1) as usize;
    for (i, digit) in room[..digits].iter_mut().enumerate() {
        let shift = 4 * (digits - 1 - i);
        *digit = HEX[(size >> shift) & 0xf];
    }
    room[digits..digits + 2].copy_from_slice(b"\r\n");
    &room[..digits + 2]
}

/// The current time as an HTTP date, formatted once a second per thread.
fn http_date() -> [u8; 29] {
    thread_local! {
        static CACHED: std::cell::Cell<(u64, [u8; 29])> = const { std::cell::Cell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let (at, text) = cached.get();
        if at == second {
            return text;
        }
        let mut text = [0u8; 29];
        let formatted = httpdate::fmt_http_date(now);
        text.copy_from_slice(&formatted.as_bytes()[..29]);
        cached.set((second, text));
        text
    })
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::net::SocketAddr;
    use std::sync::Arc;

    use http_body_util::combinators::BoxBody;
    use hyper::body::Frame;
    use hyper::header::HeaderValue;
    use tokio::net::TcpListener;
    use tokio::sync::{Notify, mpsc};

    use super::*;
    use crate::http_server::{Limits, serve as serve_listener};

    /// Longest any condition here is waited for.
    const DEADLINE: Duration = Duration::from_secs(10);

    type TestBody = BoxBody<Bytes, BoxError>;

    /// Answers by path: `/chunks` a body of unknown length in two frames
    /// (`/broken` the same, then an error), `/interim` a 103, `/short`
    /// three bytes where ten are declared, `/none` a 204, `/hang` never (telling `events` "hang" when it starts
    /// and "dropped" when given up), `/gate` once `gate` is notified
    /// (telling "gate" first); anything else `{method} {path} {body length}`.
    #[derive(Clone)]
    struct Probe {
        events: mpsc::UnboundedSender<&'static str>,
        gate: Arc<Notify>,
    }

    /// Tells `events` "dropped" when dropped.
    struct DropSignal(mpsc::UnboundedSender<&'static str>);

    impl Drop for DropSignal {
        fn drop(&mut self) {
            let _ = self.0.send("dropped");
        }
    }

    /// Data frames given out one by one, of no announced length.
    /// Data frames given out one by one, of no announced length, then an
    /// error if `fails`.
    struct Frames {
        data: VecDeque<&'static [u8]>,
        fails: bool,
    }

    impl Body for Frames {
        type Data = Bytes;
        type Error = io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
            let next = match self.data.pop_front() {
                Some(data) => Some(Ok(Frame::data(Bytes::from(data)))),
                None if std::mem::take(&mut self.fails) => Some(Err(io::Error::other("broken"))),
                None => None,
            };
            Poll::Ready(next)
        }
    }

    impl Handler for Probe {
        type Body = TestBody;

        async fn handle<B>(&self, request: Request<B>) -> Response<TestBody>
        where
            B: Body<Data = Bytes, Error: Into<BoxError>> + Send + Sync + 'static,
        {
            let boxed = |body: Full<Bytes>| body.map_err(BoxError::from).boxed();
            match request.uri().path() {
                "/chunks" | "/broken" => {
                    let frames = Frames {
                        data: VecDeque::from([b"ab".as_slice(), b"cde"]),
                        fails: request.uri().path() == "/broken",
                    };
                    return Response::new(frames.map_err(BoxError::from).boxed());
                }
                "/interim" => {
                    let mut response = Response::new(boxed(Full::default()));
                    *response.status_mut() = StatusCode::EARLY_HINTS;
                    return response;
                }
                "/short" => {
                    let mut response = Response::new(boxed(Full::new("abc".into())));
                    let declared = HeaderValue::from_static("10");
                    response
                        .headers_mut()
                        .insert(header::CONTENT_LENGTH, declared);
                    return response;
                }
                "/none" => {
                    let mut response = Response::new(boxed(Full::default()));
                    *response.status_mut() = StatusCode::NO_CONTENT;
                    return response;
                }
                "/hang" => {
                    let _signal = DropSignal(self.events.clone());
                    let _ = self.events.send("hang");
                    std::future::pending::<()>().await;
                }
                "/gate" => {
                    let _ = self.events.send("gate");
                    self.gate.notified().await;
                }
                _ => {}
            }
            let (method, path) = (request.method().clone(), request.uri().path().to_owned());
            let body = request
                .into_body()
                .collect()
                .await
                .ok()
                .map(|b| b.to_bytes());
            let length = body.map_or(0, |body| body.len());
            Response::new(boxed(Full::new(format!("{method} {path} {length}").into())))
        }
    }

    struct Server {
        addr: SocketAddr,
        events: mpsc::UnboundedReceiver<&'static str>,
        gate: Arc<Notify>,
        shutdown: CancellationToken,
    }

    impl Server {
        async fn next_event(&mut self) -> &'static str {
            let event = tokio::time::timeout(DEADLINE, self.events.recv()).await;
            event.expect("no event in time").unwrap()
        }
    }

    async fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (sender, events) = mpsc::unbounded_channel();
        let gate = Arc::new(Notify::new());
        let probe = Probe {
            events: sender,
            gate: gate.clone(),
        };
        let shutdown = CancellationToken::new();
        let limits = Limits {
            max_connections: 16,
            header_read_timeout: Duration::from_secs(60),
            drain: Duration::from_secs(5),
        };
        let serving = serve_listener(listener, limits, shutdown.clone(), "test", move |_, _| {
            probe.clone()
        });
        tokio::spawn(serving);
        Server {
            addr,
            events,
            gate,
            shutdown,
        }
    }

    /// A client connection and what it has read but not yet taken.
    struct Client {
        stream: TcpStream,
        input: Vec<u8>,
    }

    impl Client {
        async fn connect(server: &Server) -> Self {
            let stream = TcpStream::connect(server.addr).await.unwrap();
            Self {
                stream,
                input: Vec::new(),
            }
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.stream.write_all(bytes).await.unwrap();
        }

        /// Reads more; false at the end of the stream.
        async fn read_more(&mut self) -> bool {
            let mut buffer = [0u8; 4096];
            let read = tokio::time::timeout(DEADLINE, self.stream.read(&mut buffer));
            let n = read.await.expect("no answer in time").unwrap_or(0);
            self.input.extend_from_slice(&buffer[..n]);
            n > 0
        }

        /// The next response's head (lowercased) and body as sent (chunked
        /// bodies with their framing); `head_only` for a HEAD request.
        async fn response(&mut self, head_only: bool) -> (String, Vec<u8>) {
            loop {
                if let Some(taken) = self.take_response(head_only) {
                    return taken;
                }
                assert!(self.read_more().await, "closed mid-response");
            }
        }

        fn take_response(&mut self, head_only: bool) -> Option<(String, Vec<u8>)> {
            let mut fields = [httparse::EMPTY_HEADER; 32];
            let mut parsed = httparse::Response::new(&mut fields);
            let httparse::Status::Complete(head_end) = parsed.parse(&self.input).unwrap() else {
                return None;
            };
            let head = String::from_utf8_lossy(&self.input[..head_end]).to_lowercase();
            let length = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length: "))
                .map(|value| value.trim().parse::<usize>().unwrap());
            let no_body = head_only || parsed.code == Some(204);
            let end = match (no_body, length) {
                (true, _) => head_end,
                (false, Some(length)) => head_end + length,
                (false, None) => {
                    let last = self.input[head_end..]
                        .windows(5)
                        .position(|window| window == b"0\r\n\r\n")?;
                    head_end + last + 5
                }
            };
            if self.input.len() < end {
                return None;
            }
            let body = self.input[head_end..end].to_vec();
            self.input.drain(..end);
            Some((head, body))
        }

        /// Whether the server closes the connection (sending nothing more).
        async fn closed(&mut self) -> bool {
            !self.read_more().await && self.input.is_empty()
        }
    }

    fn get(path: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").into_bytes()
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_with_a_date() {
        let server = start().await;
        let mut client = Client::connect(&server).await;
        client
            .send(&[get("/a"), get("/b"), get("/c")].concat())
            .await;
        for path in ["/a", "/b", "/c"] {
            let (head, body) = client.response(false).await;
            assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
            assert!(head.contains("\r\ndate: "), "{head}");
            assert_eq!(body, format!("GET {path} 0").as_bytes());
        }
    }

    #[tokio::test]
    async fn a_request_with_a_body_goes_to_hyper_on_the_same_connection() {
        let server = start().await;
        let mut client = Client::connect(&server).await;
        client.send(&get("/first")).await;
        assert_eq!(client.response(false).await.1, b"GET /first 0");
        // From here hyper serves the connection, the body included.
        client
            .send(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello")
            .await;
        assert_eq!(client.response(false).await.1, b"POST /upload 5");
        client.send(&get("/after")).await;
        assert_eq!(client.response(false).await.1, b"GET /after 0");
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_is_sent_chunked() {
        let server = start().await;
        let mut client = Client::connect(&server).await;
        client.send(&get("/chunks")).await;
        let (head, body) = client.response(false).await;
        assert!(
            head.contains("\r\ntransfer-encoding: chunked\r\n"),
            "{head}"
        );
        assert!(!head.contains("content-length"), "{head}");
        assert_eq!(body, b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n");
        client.send(&get("/next")).await;
        assert_eq!(client.response(false).await.1, b"GET /next 0");
    }

    #[tokio::test]
    async fn head_and_no_content_responses_carry_no_body() {
        let server = start().await;
        let mut client = Client::connect(&server).await;
        client.send(b"HEAD /h HTTP/1.1\r\nhost: x\r\n\r\n").await;
        let (head, _) = client.response(true).await;
        // The length a GET would have had ("HEAD /h 0").
        assert!(head.contains("\r\ncontent-length: 9\r\n"), "{head}");
        client.send(&get("/none")).await;
        let (head, _) = client.response(true).await;
        assert!(head.starts_with("http/1.1 204 no content\r\n"), "{head}");
        assert!(!head.contains("content-length"), "{head}");
        // Had either sent body bytes, this answer would not parse.
        client.send(&get("/after")).await;
        assert_eq!(client.response(false).await.1, b"GET /after 0");
    }

    #[tokio::test]
    async fn a_client_asking_to_close_is_answered_and_disconnected() {
        let server = start().await;
        let mut client = Client::connect(&server).await;
        client
            .send(b"GET /bye HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await;
        let (head, body) = client.response(false).await;
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        assert_eq!(body, b"GET /bye 0");
        assert!(client.closed().await, "the connection stays open");
    }

    #[tokio::test]
    async fn a_head_it_does_not_take_is_answered_by_hyper() {
        let server = start().await;
        let mut malformed = Client::connect(&server).await;
        malformed
            .send(b"GET / HTTP/1.1\r\nhost: x\r\nno colon here\r\n\r\n")
            .await;
        let (head, _) = malformed.response(false).await;
        assert!(head.starts_with("http/1.1 400 "), "{head}");
        // Past this server's own limit on a head, within hyper's.
        let mut large = Client::connect(&server).await;
        let big = format!(
            "GET /big HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
            "a".repeat(70_000)
        );
        large.send(big.as_bytes()).await;
        assert_eq!(large.response(false).await.1, b"GET /big 0");
        let mut old = Client::connect(&server).await;
        old.send(b"GET /old HTTP/1.0\r\n\r\n").await;
        let (head, body) = old.response(false).await;
        assert!(head.starts_with("http/1.0 200 "), "{head}");
        assert_eq!(body, b"GET /old 0");
    }

    #[tokio::test]
    async fn a_client_that_goes_away_cancels_its_request() {
        let mut server = start().await;
        let mut client = Client::connect(&server).await;
        client.send(&get("/hang")).await;
        assert_eq!(server.next_event().await, "hang");
        drop(client);
        assert_eq!(server.next_event().await, "dropped");
    }

    #[tokio::test]
    async fn on_shutdown_a_request_in_flight_is_answered_and_its_connection_closed() {
        let mut server = start().await;
        let mut client = Client::connect(&server).await;
        client.send(&get("/gate")).await;
        assert_eq!(server.next_event().await, "gate");
        let mut idle = Client::connect(&server).await;
        idle.send(&get("/idle")).await;
        idle.response(false).await;
        server.shutdown.cancel();
        assert!(idle.closed().await, "an idle connection stays open");
        server.gate.notify_one();
        let (head, body) = client.response(false).await;
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        assert_eq!(body, b"GET /gate 0");
        assert!(client.closed().await, "the connection stays open");
    }

    #[test]
    fn chunk_size_lines_are_lowercase_hex() {
        let mut room = [0u8; 18];
        assert_eq!(chunk_size_line(&mut room, 0), b"0\r\n");
        assert_eq!(chunk_size_line(&mut room, 10), b"a\r\n");
        assert_eq!(chunk_size_line(&mut room, 4096), b"1000\r\n");
        assert_eq!(
            chunk_size_line(&mut room, usize::MAX),
            b"ffffffffffffffff\r\n"
        );
    }

    #[test]
    fn the_date_is_an_http_date_of_29_bytes() {
        let date = http_date();
        let text = std::str::from_utf8(&date).unwrap();
        assert!(text.ends_with(" GMT"), "{text}");
        assert!(httpdate::parse_http_date(text).is_ok(), "{text}");
    }

    #[test]
    fn every_field_value_httparse_gives_is_a_valid_header_value() {
        // Every byte at every place in a value long enough for httparse's
        // vectorised scans, in requests and responses, parsed as muster
        // parses them: every value taken holds only valid bytes, and a
        // value of valid bytes is taken.
        for byte in 0..=u8::MAX {
            let allowed = HeaderValue::from_bytes(&[byte]).is_ok();
            for at in 0..80 {
                let mut value = [b'v'; 80];
                value[at] = byte;
                for start in [b"GET / HTTP/1.1\r\n".as_slice(), b"HTTP/1.1 200 OK\r\n"] {
                    let head = [start, b"x: ", &value, b"\r\n\r\n"].concat();
                    let taken = parsed_values(&head);
                    for taken in &taken {
                        assert!(
                            HeaderValue::from_bytes(taken).is_ok(),
                            "{byte:#04x} at {at}"
                        );
                    }
                    // (An allowed space or tab at either end is trimmed
                    // off, as optional whitespace.)
                    assert!(!allowed || taken.len() == 1, "{byte:#04x} at {at} refused");
                }
            }
        }
    }

    #[test]
    fn a_folded_field_line_is_refused() {
        // obs-fold would put a line break inside a value.
        assert!(parsed_values(b"GET / HTTP/1.1\r\nx: a\r\n b\r\n\r\n").is_empty());
        assert!(parsed_values(b"HTTP/1.1 200 OK\r\nx: a\r\n b\r\n\r\n").is_empty());
        assert_eq!(
            parsed_values(b"HTTP/1.1 200 OK\r\nx: a b\r\n\r\n"),
            [b"a b"]
        );
    }

    /// The field values `head` parses to with `field_parser`, if it parses.
    fn parsed_values(head: &[u8]) -> Vec<Vec<u8>> {
        let mut fields = [httparse::EMPTY_HEADER; 4];
        let values =
            |fields: &[httparse::Header]| fields.iter().map(|field| field.value.to_vec()).collect();
        if head.starts_with(b"HTTP") {
            let mut response = httparse::Response::new(&mut fields);
            match field_parser().parse_response(&mut response, head) {
                Ok(httparse::Status::Complete(_)) => values(response.headers),
                _ => Vec::new(),
            }
        } else {
            let mut request = httparse::Request::new(&mut fields);
            match field_parser().parse_request(&mut request, head) {
                Ok(httparse::Status::Complete(_)) => values(request.headers),
                _ => Vec::new(),
            }
        }
    }

    #[test]
    fn only_a_zero_length_leaves_a_request_plain() {
        let plain = |name, value: &[u8]| matches!(Role::of(&name, value), Role::Plain);
        assert!(plain(header::CONTENT_LENGTH, b"0"));
        assert!(!plain(header::CONTENT_LENGTH, b"00"));
        assert!(!plain(header::CONTENT_LENGTH, b"5"));
        assert!(!plain(header::TRANSFER_ENCODING, b"chunked"));
        assert!(!plain(header::UPGRADE, b"websocket"));
        assert!(!plain(header::EXPECT, b"100-continue"));
        assert!(plain(header::HOST, b"x"));
        assert!(Role::of(&header::CONNECTION, b"keep-alive, Close").is_close());
        assert!(!Role::of(&header::CONNECTION, b"keep-alive").is_close());
    }

    #[tokio::test]
    async fn requests_sent_before_the_client_closed_its_side_are_answered() {
        let mut server = start().await;
        let mut client = Client::connect(&server).await;
        client.send(&[get("/gate"), get("/b")].concat()).await;
        assert_eq!(server.next_event().await, "gate");
        // The end of the client's side arrives while /gate is in flight;
        // another exchange gives the server time to see it before the gate
        // opens (it can only make this test stricter, never fail it).
        client.stream.shutdown().await.unwrap();
        let mut open = Client::connect(&server).await;
        open.send(&get("/other")).await;
        assert_eq!(open.response(false).await.1, b"GET /other 0");
        server.gate.notify_one();
        assert_eq!(client.response(false).await.1, b"GET /gate 0");
        assert_eq!(client.response(false).await.1, b"GET /b 0");
        assert!(client.closed().await, "the connection stays open");
    }

    #[tokio::test]
    async fn an_http2_preface_after_http1_requests_is_no_switch() {
        let server = start().await;
        let mut client = Client::connect(&server).await;
        client.send(&get("/a")).await;
        assert_eq!(client.response(false).await.1, b"GET /a 0");
        client.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        // hyper's HTTP/1 server refuses it, answering nothing (a preface
        // is no request it could answer), and ends the connection; before,
        // a partial preface here held the connection for good.
        while client.read_more().await {}
        let said = String::from_utf8_lossy(&client.input).to_lowercase();
        assert!(said.is_empty(), "{said}");
    }

    #[tokio::test]
    async fn an_interim_response_from_a_handler_becomes_a_500_and_ends_the_connection() {
        let server = start().await;
        let mut client = Client::connect(&server).await;
        client.send(&get("/interim")).await;
        let (head, body) = client.response(false).await;
        assert!(head.starts_with("http/1.1 500 "), "{head}");
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        assert!(body.is_empty());
        assert!(client.closed().await, "the connection stays open");
    }

    #[tokio::test]
    async fn a_body_shorter_than_declared_ends_the_connection() {
        let server = start().await;
        let mut client = Client::connect(&server).await;
        client.send(&get("/short")).await;
        while client.read_more().await {}
        let said = String::from_utf8_lossy(&client.input).to_lowercase();
        assert!(said.contains("\r\ncontent-length: 10\r\n"), "{said}");
        assert!(said.ends_with("\r\n\r\nabc"), "{said}");
    }

    #[tokio::test]
    async fn a_body_that_fails_midway_is_not_ended_as_if_whole() {
        let server = start().await;
        let mut client = Client::connect(&server).await;
        client.send(&get("/broken")).await;
        while client.read_more().await {}
        let said = String::from_utf8_lossy(&client.input).to_lowercase();
        // The chunks sent, and no last chunk: the client can tell.
        assert!(said.ends_with("\r\n\r\n2\r\nab\r\n3\r\ncde\r\n"), "{said}");
    }
}
