//! The tower plumbing of a layer that looks at each call's request and wraps its response.
//! The drain ([`crate::drain`]) and the metrics ([`crate::metrics`]) layers are two such
//! wrappers; each says only what it does with a call.

use std::{
    future::Future,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use tower::{Layer, Service};

/// What a [`CallLayer`] does with each call.
pub trait CallWrapper: Clone {
    /// What the wrapper takes from the request to its response.
    type Call: Send + 'static;
    /// The response body handed on in place of the inner service's `B`.
    type Body<B>;

    /// Called before the inner service sees `request`.
    fn start<ReqBody>(&self, request: &http::Request<ReqBody>) -> Self::Call;

    /// Turns the inner service's response into the one handed on.
    fn finish<ResBody, E, F>(
        call: Self::Call,
        response: F,
    ) -> BoxFuture<'static, Result<http::Response<Self::Body<ResBody>>, E>>
    where
        F: Future<Output = Result<http::Response<ResBody>, E>> + Send + 'static;
}

/// A layer that applies the wrapper `W` to every call.
#[derive(Clone)]
pub struct CallLayer<W> {
    wrapper: W,
}

impl<W> CallLayer<W> {
    pub fn with(wrapper: W) -> Self {
        Self { wrapper }
    }
}

impl<S, W: Clone> Layer<S> for CallLayer<W> {
    type Service = CallService<S, W>;

    fn layer(&self, inner: S) -> Self::Service {
        CallService {
            inner,
            wrapper: self.wrapper.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CallService<S, W> {
    inner: S,
    wrapper: W,
}

impl<S, W, ReqBody, ResBody> Service<http::Request<ReqBody>> for CallService<S, W>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    W: CallWrapper,
{
    type Response = http::Response<W::Body<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let call = self.wrapper.start(&request);
        let response = self.inner.call(request);
        W::finish(call, response)
    }
}
