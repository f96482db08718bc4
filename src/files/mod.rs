//! File relay domain: the file kinds ([`kind`]), what may be uploaded ([`policy`]), checking
//! bytes as they arrive ([`sniff`]), a SHA-256 that can be checkpointed and resumed
//! ([`digest`]), the upload / download / delete rules ([`service`]) and resumable uploads
//! ([`resume`]).

pub mod digest;
pub mod kind;
pub mod policy;
pub mod resume;
pub mod service;
pub mod sniff;
