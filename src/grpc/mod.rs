//! The gRPC edge: generated types, authentication of every public RPC, the one mapping from
//! domain errors to `tonic::Status`, and thin adapters that turn requests into domain calls.

pub mod convert;
pub mod file_relay;
pub mod messaging;
pub mod status;

use tonic::{Request, Status, service::Interceptor};

use crate::auth::{Authenticator, Caller, USER_ID_HEADER};

/// Code generated from `proto/messaging/v1`.
#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("messaging.v1");

    /// The encoded descriptors of the contract (with comments), served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/messaging_v1_descriptor.bin"));
}

impl Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata();
        let authorization = metadata
            .get("authorization")
            .and_then(|value| value.to_str().ok());
        let user_id = metadata
            .get(USER_ID_HEADER)
            .and_then(|value| value.to_str().ok());
        let caller = self.authenticate(authorization, user_id)?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The caller the interceptor authenticated.
pub(crate) fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("the request was not authenticated"))
}
