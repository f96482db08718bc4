//! The caller's deadline (`grpc-timeout`), enforced over the whole call and answered with
//! `DEADLINE_EXCEEDED` (reason `DEADLINE_EXCEEDED`).
//!
//! tonic enforces the same header on its own, but only until the response headers, and answers
//! with `CANCELLED "Timeout expired"`: a code clients read as "the caller gave up" and do not
//! retry, although a send may well have been stored. This layer always answers first: tonic calls
//! it from inside its own timeout, before arming that timer, so this deadline is never later than
//! tonic's, and each poll checks the clock itself rather than waiting for the timer to fire.
//! Past the response headers (server streams) tonic enforces nothing; here the stream then ends
//! with `DEADLINE_EXCEEDED` trailers, and what it held (a subscription slot, a download) is
//! released at once rather than when the client gets round to resetting the stream.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::{
    call_layer::{CallLayer, CallWrapper},
    error::{Error, ErrorKind, Reason},
};

/// Ends every call whose `grpc-timeout` has run out with `DEADLINE_EXCEEDED`.
pub type DeadlineLayer = CallLayer<Deadlines>;

impl DeadlineLayer {
    pub fn new() -> Self {
        CallLayer::with(Deadlines)
    }
}

impl Default for DeadlineLayer {
    fn default() -> Self {
        Self::new()
    }
}

/// The [`CallWrapper`] of the deadline layer.
#[derive(Clone)]
pub struct Deadlines;

impl CallWrapper for Deadlines {
    /// When the call must be over, if the caller said.
    type Call = Option<Instant>;
    type Body<B> = DeadlineBody<B>;

    fn start<ReqBody>(&self, request: &http::Request<ReqBody>) -> Option<Instant> {
        // Read now, not when the response future is first polled: this is what puts the
        // deadline no later than tonic's.
        let timeout = parse_grpc_timeout(request.headers().get("grpc-timeout")?)?;
        Instant::now().checked_add(timeout)
    }

    fn finish<ResBody, E, F>(
        deadline: Option<Instant>,
        response: F,
    ) -> BoxFuture<'static, Result<http::Response<DeadlineBody<ResBody>>, E>>
    where
        F: Future<Output = Result<http::Response<ResBody>, E>> + Send + 'static,
    {
        Box::pin(async move {
            let Some(deadline) = deadline else {
                let (parts, body) = response.await?.into_parts();
                return Ok(http::Response::from_parts(
                    parts,
                    DeadlineBody::new(Some(body), None),
                ));
            };
            let mut response = std::pin::pin!(response);
            let mut timer = std::pin::pin!(tokio::time::sleep_until(deadline));
            let answered = std::future::poll_fn(|cx| {
                if let Poll::Ready(result) = response.as_mut().poll(cx) {
                    return Poll::Ready(Some(result));
                }
                if expired(timer.as_mut(), deadline, cx) {
                    return Poll::Ready(None);
                }
                Poll::Pending
            })
            .await;
            match answered {
                Some(result) => {
                    let (parts, body) = result?.into_parts();
                    Ok(http::Response::from_parts(
                        parts,
                        DeadlineBody::new(Some(body), Some(deadline)),
                    ))
                }
                // A trailers-only response: the status travels in the headers.
                None => {
                    let mut response = http::Response::new(DeadlineBody::new(None, None));
                    let headers = response.headers_mut();
                    headers.insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("application/grpc"),
                    );
                    headers.extend(deadline_exceeded());
                    Ok(response)
                }
            }
        })
    }
}

/// Whether `deadline` has passed: by the timer, or by the clock when the timer has not fired yet
/// (tonic's timer for the same deadline may fire first, and the answer must still be ours).
fn expired(timer: Pin<&mut Sleep>, deadline: Instant, cx: &mut Context<'_>) -> bool {
    timer.poll(cx).is_ready() || Instant::now() >= deadline
}

/// The status of a call whose deadline ran out, as gRPC headers (or trailers).
fn deadline_exceeded() -> HeaderMap {
    let status = tonic::Status::from(Error::new(
        ErrorKind::DeadlineExceeded,
        Reason::DeadlineExceeded,
        "the call's deadline (grpc-timeout) expired",
    ));
    let mut headers = HeaderMap::new();
    status
        .add_header(&mut headers)
        .expect("an ASCII message and base64 details are valid header values");
    headers
}

/// The `grpc-timeout` header: at most 8 digits and a unit (H, M, S, m, u, n). Anything else is
/// ignored, as tonic ignores it.
fn parse_grpc_timeout(value: &HeaderValue) -> Option<Duration> {
    let value = value.to_str().ok()?;
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    match unit {
        "H" => Some(Duration::from_secs(amount * 3600)),
        "M" => Some(Duration::from_secs(amount * 60)),
        "S" => Some(Duration::from_secs(amount)),
        "m" => Some(Duration::from_millis(amount)),
        "u" => Some(Duration::from_micros(amount)),
        "n" => Some(Duration::from_nanos(amount)),
        _ => None,
    }
}

pin_project_lite::pin_project! {
    /// A response body that ends with `DEADLINE_EXCEEDED` trailers once the deadline passes.
    pub struct DeadlineBody<B> {
        #[pin]
        inner: Option<B>,
        deadline: Option<Instant>,
        timer: Option<Pin<Box<Sleep>>>,
        done: bool,
    }
}

impl<B> DeadlineBody<B> {
    fn new(inner: Option<B>, deadline: Option<Instant>) -> Self {
        Self {
            done: inner.is_none(),
            inner,
            deadline,
            timer: deadline.map(|deadline| Box::pin(tokio::time::sleep_until(deadline))),
        }
    }
}

impl<B: Body> Body for DeadlineBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if let Some(inner) = this.inner.as_mut().as_pin_mut() {
            let polled = inner.poll_frame(cx);
            if !matches!(polled, Poll::Pending) {
                if matches!(polled, Poll::Ready(None)) {
                    *this.done = true;
                }
                return polled;
            }
        }
        if let (Some(timer), Some(deadline)) = (this.timer.as_mut(), *this.deadline)
            && expired(timer.as_mut(), deadline, cx)
        {
            *this.done = true;
            // Dropped now, so a subscription or download stops holding its slot and buffers.
            this.inner.set(None);
            return Poll::Ready(Some(Ok(Frame::trailers(deadline_exceeded()))));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(value: &str) -> Option<Duration> {
        parse_grpc_timeout(&HeaderValue::from_str(value).unwrap())
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parsed("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parsed("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parsed("1S"), Some(Duration::from_secs(1)));
        assert_eq!(parsed("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parsed("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parsed("5n"), Some(Duration::from_nanos(5)));
    }

    #[test]
    fn malformed_grpc_timeouts_are_ignored() {
        for value in [
            "",
            "S",
            "100",
            "100x",
            "123456789S",
            "-1S",
            "1.5S",
            "+1S",
            "１S",
        ] {
            assert_eq!(parsed(value), None, "{value:?}");
        }
    }

    #[test]
    fn the_status_is_deadline_exceeded_with_its_reason() {
        use tonic_types::StatusExt;
        let mut response = http::Response::new(());
        response.headers_mut().extend(deadline_exceeded());
        let status = tonic::Status::from_header_map(response.headers()).expect("a status");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(
            status.get_details_error_info().expect("ErrorInfo").reason,
            "DEADLINE_EXCEEDED"
        );
    }
}
