//! File relay domain: what may be uploaded ([`policy`]), checking bytes as they arrive
//! ([`sniff`]), each caller's open uploads ([`slots`]), and the upload / download / delete rules
//! ([`service`]).

pub mod policy;
pub mod service;
pub mod slots;
pub mod sniff;
