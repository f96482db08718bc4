//! Ending RPCs cleanly at the end of a graceful shutdown. Once the grace period is over, every
//! call still open — a unary call still working or a server stream that would run forever, such
//! as a health `Watch` — is finished with `UNAVAILABLE` ("server is shutting down") instead of
//! having its connection cut, so clients get a status they know to retry elsewhere.
//!
//! The same ending comes to the calls of one connection past `server.max_connection_age` and
//! its grace ([`crate::transport::ConnectionDeadlines`]): `UNAVAILABLE` with reason
//! `CONNECTION_MAX_AGE`, after which the connection, already told GOAWAY, closes by itself.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::TcpConnectInfo;

use crate::{
    call_layer::{CallLayer, CallWrapper},
    error::{Error, ErrorKind, Reason},
    transport::ConnectionDeadlines,
};

const UNAVAILABLE: &str = "14";
const MESSAGE: &str = "server is shutting down";

/// Ends the calls still open when its token is cancelled with `UNAVAILABLE`.
pub type DrainLayer = CallLayer<Drain>;

impl DrainLayer {
    /// Calls still open when `cancel` fires are ended with `UNAVAILABLE`.
    pub fn new(cancel: CancellationToken) -> Self {
        CallLayer::with(Drain {
            cancel,
            connection_deadlines: None,
        })
    }

    /// Also ends each call when its connection's deadline in `deadlines` passes.
    pub fn with_connection_deadlines(
        cancel: CancellationToken,
        deadlines: ConnectionDeadlines,
    ) -> Self {
        CallLayer::with(Drain {
            cancel,
            connection_deadlines: Some(deadlines),
        })
    }
}

/// The [`CallWrapper`] of the drain.
#[derive(Clone)]
pub struct Drain {
    cancel: CancellationToken,
    connection_deadlines: Option<ConnectionDeadlines>,
}

/// What ends one call early: the shutdown, or its connection's age.
pub struct CallEnd {
    cancel: CancellationToken,
    connection_deadline: Option<Instant>,
}

/// Why a call was ended.
enum Ending {
    Shutdown,
    ConnectionAge,
}

impl Ending {
    fn status(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        match self {
            Ending::Shutdown => {
                headers.insert("grpc-status", HeaderValue::from_static(UNAVAILABLE));
                headers.insert("grpc-message", HeaderValue::from_static(MESSAGE));
            }
            Ending::ConnectionAge => {
                let status = tonic::Status::from(Error::new(
                    ErrorKind::Unavailable,
                    Reason::ConnectionMaxAge,
                    "the connection reached server.max_connection_age; call again on a new connection",
                ));
                status
                    .add_header(&mut headers)
                    .expect("an ASCII message and base64 details are valid header values");
            }
        }
        headers
    }
}

/// Resolves when a call must end, with the reason.
struct EndSignal {
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    connection_aged: Option<Pin<Box<Sleep>>>,
}

impl EndSignal {
    fn new(end: CallEnd) -> Self {
        Self {
            cancelled: Box::pin(end.cancel.cancelled_owned()),
            connection_aged: end
                .connection_deadline
                .map(|deadline| Box::pin(tokio::time::sleep_until(deadline))),
        }
    }
}

impl Future for EndSignal {
    type Output = Ending;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Ending> {
        if self.cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ending::Shutdown);
        }
        if let Some(aged) = &mut self.connection_aged
            && aged.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Ending::ConnectionAge);
        }
        Poll::Pending
    }
}

impl CallWrapper for Drain {
    type Call = CallEnd;
    type Body<B> = DrainBody<B>;

    fn start<ReqBody>(&self, request: &http::Request<ReqBody>) -> CallEnd {
        // tonic puts the connection's ConnectInfo into every request; the client's address
        // names the connection.
        let connection_deadline = self.connection_deadlines.as_ref().and_then(|deadlines| {
            let peer = request
                .extensions()
                .get::<TcpConnectInfo>()?
                .remote_addr()?;
            deadlines.of_peer(peer)
        });
        CallEnd {
            cancel: self.cancel.clone(),
            connection_deadline,
        }
    }

    fn finish<ResBody, E, F>(
        end: CallEnd,
        response: F,
    ) -> BoxFuture<'static, Result<http::Response<DrainBody<ResBody>>, E>>
    where
        F: Future<Output = Result<http::Response<ResBody>, E>> + Send + 'static,
    {
        Box::pin(async move {
            let mut ended = EndSignal::new(end);
            tokio::select! {
                biased;
                response = response => {
                    let (parts, body) = response?.into_parts();
                    Ok(http::Response::from_parts(parts, DrainBody::new(Some(body), ended)))
                }
                ending = &mut ended => {
                    // A trailers-only response: the status travels in the headers.
                    let mut response = http::Response::new(DrainBody::new(None, ended));
                    let headers = response.headers_mut();
                    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
                    headers.extend(ending.status());
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
        ended: EndSignal,
        done: bool,
    }
}

impl<B> DrainBody<B> {
    fn new(inner: Option<B>, ended: EndSignal) -> Self {
        let done = inner.is_none();
        Self { inner, ended, done }
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
        if let Poll::Ready(ending) = Pin::new(this.ended).poll(cx) {
            *this.done = true;
            return Poll::Ready(Some(Ok(Frame::trailers(ending.status()))));
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
