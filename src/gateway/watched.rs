//! Bodies passed through unchanged while something watches them: the
//! bytes that go by and how the body ends. The access record, the
//! upstream pool's return of a connection and its upload tracking all
//! watch a body this way.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::proxy::BoxError;

/// How a watched body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Every frame went through. hyper stops polling a body that says it
    /// has ended, so this is known after the last frame, or at drop.
    Complete,
    /// The body gave an error.
    Failed,
    /// It was dropped before its end (the peer went away).
    Abandoned,
}

/// What watches a body.
pub trait Watcher {
    /// `bytes` of data went by.
    fn data(&mut self, _bytes: usize) {}

    /// The body ended, once, however it did.
    fn ended(self, how: Ending);
}

/// `inner`, reported to `watcher`.
pub struct Watched<B: HttpBody, W: Watcher> {
    inner: B,
    /// Taken when the end is reported.
    watcher: Option<W>,
}

impl<B: HttpBody, W: Watcher> Watched<B, W> {
    pub fn new(inner: B, watcher: W) -> Self {
        Self {
            inner,
            watcher: Some(watcher),
        }
    }

    fn end(&mut self, how: Ending) {
        if let Some(watcher) = self.watcher.take() {
            watcher.ended(how);
        }
    }

    /// Reports the end now if the body is already known to be empty.
    pub fn end_if_empty(&mut self) {
        if self.inner.is_end_stream() {
            self.end(Ending::Complete);
        }
    }
}

impl<B, W> HttpBody for Watched<B, W>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    W: Watcher + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(watcher)) = (frame.data_ref(), &mut this.watcher) {
                    watcher.data(data.remaining());
                }
                this.end_if_empty();
            }
            Poll::Ready(Some(Err(_))) => this.end(Ending::Failed),
            Poll::Ready(None) => this.end(Ending::Complete),
            Poll::Pending => {}
        }
        polled.map(|frame| frame.map(|result| result.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: HttpBody, W: Watcher> Drop for Watched<B, W> {
    fn drop(&mut self) {
        let how = if self.inner.is_end_stream() {
            Ending::Complete
        } else {
            Ending::Abandoned
        };
        self.end(how);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;

    /// A body of `frames`.
    fn stream_body<I>(frames: I) -> StreamBody<futures_util::stream::Iter<I>>
    where
        I: Iterator<Item = Result<Frame<Bytes>, BoxError>>,
    {
        StreamBody::new(futures_util::stream::iter(frames))
    }

    /// Records what it saw, for the test to read.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<(usize, Vec<Ending>)>>);

    impl Watcher for Seen {
        fn data(&mut self, bytes: usize) {
            self.0.lock().unwrap().0 += bytes;
        }

        fn ended(self, how: Ending) {
            self.0.lock().unwrap().1.push(how);
        }
    }

    impl Seen {
        fn get(&self) -> (usize, Vec<Ending>) {
            self.0.lock().unwrap().clone()
        }
    }

    #[tokio::test]
    async fn a_body_read_through_ends_complete_once() {
        let seen = Seen::default();
        let body = Watched::new(Full::new(Bytes::from_static(b"hello")), seen.clone());
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(collected, "hello");
        assert_eq!(seen.get(), (5, vec![Ending::Complete]));
    }

    #[tokio::test]
    async fn a_body_dropped_midway_is_abandoned_and_an_error_is_failed() {
        let frames = [Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"ab")))];
        let unfinished = stream_body(frames.into_iter().chain(std::iter::repeat_with(|| {
            Ok(Frame::data(Bytes::from_static(b"c")))
        })));
        let seen = Seen::default();
        let mut body = Watched::new(unfinished, seen.clone());
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert_eq!(seen.get(), (2, vec![Ending::Abandoned]));

        let broken = stream_body([Err::<Frame<Bytes>, BoxError>("broken".into())].into_iter());
        let seen = Seen::default();
        let mut body = Watched::new(broken, seen.clone());
        assert!(body.frame().await.unwrap().is_err());
        drop(body);
        assert_eq!(seen.get(), (0, vec![Ending::Failed]));
    }

    #[test]
    fn an_empty_body_can_end_before_it_is_polled() {
        let seen = Seen::default();
        let mut body = Watched::new(http_body_util::Empty::<Bytes>::new(), seen.clone());
        body.end_if_empty();
        assert_eq!(seen.get(), (0, vec![Ending::Complete]));
        drop(body);
        assert_eq!(seen.get().1.len(), 1, "reported once");
    }
}
