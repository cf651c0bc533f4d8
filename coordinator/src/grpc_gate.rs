//! The client service's admission by method: a tower layer in front of `ClientServiceServer`
//! that checks each call's bearer token against the gRPC method it names, so that a viewer token
//! reaches only the queries ([`crate::auth::READ_ONLY_METHODS`]). An interceptor cannot do this:
//! it does not see the request's path.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;

use crate::auth::{Service, Tokens};

/// `inner`, admitting only the calls `tokens` allow for their method.
#[derive(Debug, Clone)]
pub struct MethodGate<S> {
    inner: S,
    tokens: Tokens,
    service: Service,
}

impl<S> MethodGate<S> {
    /// Gates `inner`, a server of `service`.
    pub fn new(inner: S, tokens: Tokens, service: Service) -> Self {
        Self { inner, tokens, service }
    }
}

impl<S: NamedService> NamedService for MethodGate<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower_service::Service<http::Request<B>> for MethodGate<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().rsplit('/').next().unwrap_or_default().to_string();
        let probe = tonic::Request::from_parts(MetadataMap::from_headers(request.headers().clone()), http::Extensions::default(), ());
        match self.tokens.check_method(&probe, self.service, &method) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}
