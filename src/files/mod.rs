//! File relay domain: what may be uploaded ([`policy`]), checking bytes as they arrive
//! ([`sniff`]), and the upload / download / delete rules ([`service`]).

pub mod policy;
pub mod service;
pub mod sniff;
