//! File relay domain: the file kinds ([`kind`]), what may be uploaded ([`policy`]), checking
//! bytes as they arrive ([`sniff`]), and the upload / download / delete rules ([`service`]).

pub mod kind;
pub mod policy;
pub mod service;
pub mod sniff;
