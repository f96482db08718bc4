//! File relay domain: what may be uploaded and, in later steps, the upload pipeline.

pub mod policy;
pub mod sniff;
