//! File relay domain: the file kinds ([`kind`]), what may be uploaded ([`policy`]), checking
//! bytes as they arrive ([`sniff`]), a SHA-256 that can be checkpointed and resumed
//! ([`digest`]), the upload / download / delete rules ([`service`]), resumable uploads
//! ([`resume`]) and the removal of what interrupted uploads left ([`janitor`]).

pub mod digest;
pub mod janitor;
pub mod kind;
pub mod policy;
pub mod resume;
pub mod service;
pub mod sniff;
