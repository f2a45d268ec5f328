//! A response body that gives up on an upstream gone quiet: when no frame
//! arrives for the route's `read_timeout`, the body fails, so the client's
//! connection is cut (its response cannot be completed) and the upstream
//! connection is closed rather than pooled. Without it, an upstream that
//! stalls after its headers would hold the client, and both connections,
//! for as long as the client waits.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::proxy::BoxError;

/// Why a quiet body failed.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent nothing for {0:?} in the middle of its response body")]
pub struct WentQuiet(pub Duration);

/// `inner`, failing once it has been pending for `limit` with nothing new.
pub struct QuietLimit<B> {
    inner: B,
    limit: Duration,
    /// Armed when the body first waits, so a body that is already there
    /// (most small ones) never touches the timer.
    timer: Option<Pin<Box<Sleep>>>,
    /// A frame came since the timer was last set.
    progressed: bool,
}

impl<B> QuietLimit<B> {
    pub fn new(inner: B, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            timer: None,
            progressed: false,
        }
    }

    /// Polls the timer, starting it or moving it on as the body went.
    fn poll_quiet(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let progressed = std::mem::take(&mut self.progressed);
        let limit = self.limit;
        let timer = match &mut self.timer {
            Some(timer) => {
                if progressed {
                    timer.as_mut().reset(Instant::now() + limit);
                }
                timer
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep(limit))),
        };
        timer.as_mut().poll(cx)
    }
}

impl<B> HttpBody for QuietLimit<B>
where
    B: HttpBody<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.progressed = true;
            return Poll::Ready(frame);
        }
        ready!(this.poll_quiet(cx));
        Poll::Ready(Some(Err(Box::new(WentQuiet(this.limit)))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use http_body_util::{BodyExt, StreamBody};

    use super::*;
    use crate::gateway::proxy::Body;

    /// A body that sends `first`, then nothing ever again.
    fn stalls_after(first: &'static str) -> Body {
        let frame = Ok::<_, BoxError>(Frame::data(Bytes::from(first)));
        let frames = futures_util::stream::iter([frame]).chain(futures_util::stream::pending());
        BodyExt::boxed(StreamBody::new(frames))
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_goes_quiet_fails_after_the_limit() {
        let limit = Duration::from_secs(60);
        let mut body = QuietLimit::new(stalls_after("head"), limit);
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "head");
        let started = Instant::now();
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.is::<WentQuiet>(), "{error}");
        assert_eq!(
            started.elapsed(),
            limit,
            "the paused clock moved by the limit"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn each_frame_restarts_the_limit() {
        let limit = Duration::from_secs(10);
        let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
        let frames = futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx));
        let mut body = QuietLimit::new(BodyExt::boxed(StreamBody::new(frames)), limit);
        // Five frames half a limit apart: two and a half limits in all.
        let feeder = tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(limit / 2).await;
                let frame = Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"x")));
                sender.send(frame).unwrap();
            }
            sender
        });
        for n in 0..5 {
            let frame = body.frame().await.unwrap();
            assert!(
                frame.is_ok(),
                "frame {n} came within the limit of the one before"
            );
        }
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.is::<WentQuiet>(), "{error}");
        drop(feeder.await.unwrap());
    }
}
