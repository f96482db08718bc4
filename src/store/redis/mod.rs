//! The Redis message store (being written).
