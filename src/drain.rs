//! Ending RPCs cleanly at the end of a graceful shutdown. Once the grace period is over, every
//! call still open — a unary call still working or a server stream that would run forever, such
//! as a health `Watch` — is finished with `UNAVAILABLE` ("server is shutting down") instead of
//! having its connection cut, so clients get a status they know to retry elsewhere.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::call_layer::{CallLayer, CallWrapper};

const UNAVAILABLE: &str = "14";
const MESSAGE: &str = "server is shutting down";

/// Ends the calls still open when its token is cancelled with `UNAVAILABLE`.
pub type DrainLayer = CallLayer<Drain>;

impl DrainLayer {
    /// Calls still open when `cancel` fires are ended with `UNAVAILABLE`.
    pub fn new(cancel: CancellationToken) -> Self {
        CallLayer::with(Drain { cancel })
    }
}

/// The [`CallWrapper`] of the drain.
#[derive(Clone)]
pub struct Drain {
    cancel: CancellationToken,
}

impl CallWrapper for Drain {
    type Call = CancellationToken;
    type Body<B> = DrainBody<B>;

    fn start<ReqBody>(&self, _request: &http::Request<ReqBody>) -> CancellationToken {
        self.cancel.clone()
    }

    fn finish<ResBody, E, F>(
        cancel: CancellationToken,
        response: F,
    ) -> BoxFuture<'static, Result<http::Response<DrainBody<ResBody>>, E>>
    where
        F: Future<Output = Result<http::Response<ResBody>, E>> + Send + 'static,
    {
        Box::pin(async move {
            tokio::select! {
                biased;
                response = response => {
                    let (parts, body) = response?.into_parts();
                    Ok(http::Response::from_parts(parts, DrainBody::new(Some(body), cancel)))
                }
                () = cancel.clone().cancelled_owned() => {
                    // A trailers-only response: the status travels in the headers.
                    let mut response = http::Response::new(DrainBody::new(None, cancel));
                    let headers = response.headers_mut();
                    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
                    headers.insert("grpc-status", HeaderValue::from_static(UNAVAILABLE));
                    headers.insert("grpc-message", HeaderValue::from_static("server%20is%20shutting%20down"));
                    Ok(response)
                }
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that ends with `UNAVAILABLE` trailers once shutdown cancels it.
    pub struct DrainBody<B> {
        #[pin]
        inner: Option<B>,
        cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
        done: bool,
    }
}

impl<B> DrainBody<B> {
    fn new(inner: Option<B>, cancel: CancellationToken) -> Self {
        let done = inner.is_none();
        Self {
            inner,
            cancelled: Box::pin(cancel.cancelled_owned()),
            done,
        }
    }
}

impl<B: Body> Body for DrainBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if let Some(inner) = this.inner.as_pin_mut() {
            let polled = inner.poll_frame(cx);
            if !matches!(polled, Poll::Pending) {
                if matches!(polled, Poll::Ready(None)) {
                    *this.done = true;
                }
                return polled;
            }
        }
        if this.cancelled.as_mut().poll(cx).is_ready() {
            *this.done = true;
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static(UNAVAILABLE));
            trailers.insert("grpc-message", HeaderValue::from_static(MESSAGE));
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.as_ref().is_some_and(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}
