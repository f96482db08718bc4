//! The gRPC edge: generated types, authentication of every public RPC, the one mapping from
//! domain errors to `tonic::Status`, and thin adapters that turn requests into domain calls.

pub mod convert;
pub mod file_relay;
pub mod messaging;
pub mod status;

use tonic::{Request, Status, service::Interceptor};

use crate::auth::{AUTHORIZATION_HEADER, Authenticator, Caller, USER_ID_HEADER, single_credential};

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
        let credential = |name: &str| {
            single_credential(
                name,
                metadata
                    .get_all(name)
                    .iter()
                    .map(|value| value.to_str().ok()),
            )
        };
        // Only the credential the mode reads is checked: a JWT caller's gateway may well
        // forward an `x-user-id` of its own, which this mode ignores.
        let (authorization, user_id) = if self.is_trusted_header() {
            (None, credential(USER_ID_HEADER)?)
        } else {
            (credential(AUTHORIZATION_HEADER)?, None)
        };
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
